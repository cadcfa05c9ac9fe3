"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017): the
model's logits divided by a temperature fitted on the validation split, so that a score of 0.8
means about 80% positives. One temperature for a softmax model (the classes share one scale),
one per label for a sigmoid model (each label is its own binary classifier).

Scores are the model's probabilities, so this works for any model, ours or a user's: the logits
are recovered from them (log p for softmax, up to a per-row constant that softmax ignores;
log(p / (1 - p)) for sigmoid). Dividing by T > 0 keeps every label's ranking, so AUROC is
unchanged; only how confident the scores are changes.

The negative log-likelihood is convex in 1 / T, so its minimum is the root of a monotone
derivative, found by bisection: exact, no optimiser to tune, and no dependency beyond numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medray.workers import metrics
from medray.workers.errors import InputError

METHOD = "temperature scaling (Guo et al. 2017)"
BINS = 10  # equal-width bins of the expected calibration error, as in the report
_EPS = 1e-12  # probabilities are clipped to [eps, 1 - eps] before taking logs
_BETA_RANGE = (1e-3, 1e3)  # 1 / T searched in here: T from 0.001 to 1000


def to_logits(scores: np.ndarray, multi_label: bool) -> np.ndarray:
    """Logits (float64) behind probabilities: log p (softmax) or log(p / (1 - p)) (sigmoid)."""
    p = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1.0 - _EPS)
    if multi_label:
        return np.log(p) - np.log1p(-p)
    return np.log(p)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def _root(grad: Any) -> float:
    """The beta in _BETA_RANGE where the increasing function ``grad`` crosses zero (or the
    nearer end of the range), bisected on log(beta)."""
    lo, hi = (math.log(b) for b in _BETA_RANGE)
    if grad(math.exp(lo)) >= 0:
        return math.exp(lo)
    if grad(math.exp(hi)) <= 0:
        return math.exp(hi)
    for _ in range(80):  # the bracket shrinks to ~1e-23 of its log-width: float64 exact
        mid = (lo + hi) / 2
        if grad(math.exp(mid)) > 0:
            hi = mid
        else:
            lo = mid
    return math.exp((lo + hi) / 2)


def fit_softmax(logits: np.ndarray, y: np.ndarray) -> float:
    """One temperature for a softmax model; ``y`` one-hot (rows with one positive class)."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    if z.ndim != 2 or z.shape != t.shape:
        raise InputError(f"logits {z.shape} and targets {t.shape} must be (n, classes) alike")
    keep = t.sum(axis=1) == 1
    z, t = z[keep], t[keep]
    if not len(z):
        raise InputError("no validation rows with exactly one true class to fit a temperature")
    z_true = (z * t).sum(axis=1)

    def grad(beta: float) -> float:  # d/d(beta) of mean(logsumexp(beta z) - beta z_true)
        return float(np.mean((_softmax(beta * z) * z).sum(axis=1) - z_true))

    return 1.0 / _root(grad)


def fit_sigmoid(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature of one sigmoid label; ``y`` 0/1. NaN when a class is missing (the
    likelihood then has no finite optimum: the caller keeps T = 1)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    t = np.asarray(y, dtype=np.float64).reshape(-1)
    if z.shape != t.shape:
        raise InputError(f"logits {z.shape} and targets {t.shape} must have one row each")
    if not 0 < t.sum() < len(t):
        return math.nan

    def grad(beta: float) -> float:  # d/d(beta) of mean(softplus(beta z) - t beta z)
        return float(np.mean((_sigmoid(beta * z) - t) * z))

    return 1.0 / _root(grad)


def fit(scores: np.ndarray, y: np.ndarray, labels: Sequence[str], multi_label: bool
        ) -> dict[str, float]:
    """Temperature per label fitted on validation scores (one shared value for softmax); a
    label whose validation has one class keeps 1.0."""
    z = to_logits(scores, multi_label)
    if not multi_label:
        t = fit_softmax(z, y)
        return dict.fromkeys(labels, t)
    out = {}
    for j, label in enumerate(labels):
        t = fit_sigmoid(z[:, j], y[:, j])
        out[label] = 1.0 if not math.isfinite(t) else t
    return out


def apply(scores: np.ndarray, temperatures: Sequence[float], multi_label: bool) -> np.ndarray:
    """Calibrated probabilities (float32) for raw ``scores`` (n, labels); NaN rows stay NaN."""
    s = np.asarray(scores, dtype=np.float64)
    temps = np.asarray(temperatures, dtype=np.float64)
    if s.ndim != 2 or temps.shape != (s.shape[1],) or not np.all(temps > 0):
        raise InputError(f"need one positive temperature per score column, got {temps} for "
                         f"scores of shape {s.shape}")
    bad = np.asarray(~np.isfinite(s).all(axis=1), dtype=bool)
    z = to_logits(np.where(bad[:, None], 0.5, s), multi_label) / temps
    out = _sigmoid(z) if multi_label else _softmax(z)
    out[bad] = np.nan
    return out.astype(np.float32)


def temperatures(card_calibration: Mapping[str, Any] | None, labels: Sequence[str]
                 ) -> list[float] | None:
    """The temperatures a model card stores, in label order; None when it has none."""
    temps = (card_calibration or {}).get("temperature")
    if not temps:
        return None
    return [float(temps.get(label, 1.0)) for label in labels]


def ece(y: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Expected calibration error per label (equal-width bins, as the report computes it)."""
    out = {}
    for j, label in enumerate(labels):
        out[label] = metrics.calibration(y[:, j], scores[:, j], BINS)["ece"] if len(y) \
            else math.nan
    return out


def nll(y: np.ndarray, scores: np.ndarray, multi_label: bool) -> float:
    """Mean negative log-likelihood: per row for softmax, per row and label for sigmoid."""
    p = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1.0 - _EPS)
    t = np.asarray(y, dtype=np.float64)
    if not len(p):
        return math.nan
    if multi_label:
        return float(np.mean(-(t * np.log(p) + (1 - t) * np.log1p(-p))))
    return float(np.mean(-(t * np.log(p)).sum(axis=1)))


def calibrate(scores: np.ndarray, y: np.ndarray, labels: Sequence[str], multi_label: bool,
              split: str) -> tuple[dict[str, Any], np.ndarray]:
    """Fit on ``split``'s scores and targets: (the model card's ``calibration``, calibrated
    scores). The card keeps ECE and NLL before and after, so the fit can be judged."""
    temps = fit(scores, y, labels, multi_label)
    after = apply(scores, [temps[label] for label in labels], multi_label)
    card = {"method": METHOD, "fitted_on": split, "images": int(len(y)),
            "shared": not multi_label, "temperature": temps, "bins": BINS,
            "ece_before": ece(y, scores, labels), "ece_after": ece(y, after, labels),
            "nll_before": nll(y, scores, multi_label), "nll_after": nll(y, after, multi_label)}
    return card, after


def mean_ece(per_label: Mapping[str, float]) -> float:
    finite = [v for v in per_label.values() if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
