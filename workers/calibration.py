"""Calibration after training: temperature scaling (Guo et al., "On Calibration of Modern
Neural Networks", 2017), with a bias beside the temperature where it helps on held-out data, so
that a score of 0.8 means about 80% positives. One temperature for a softmax model (the classes
share one scale) with one bias per class; one temperature and one bias per label for a sigmoid
model (each label is its own binary classifier; with the bias this is Platt scaling).

Four forms, chosen by the user (``--calibration-form``); unset, the training's recipe chooses
(``TrainSpec.for_images``: the balanced bias after a crop of 0.15 or more, else the temperature):

- ``temperature``: a temperature alone. It cannot move the decision boundary, so the validation
  split's prevalence stays out of the scores; on PneumoniaMNIST, whose test split is drawn
  unlike its validation split (62.5% against 74% positives), it gives the lower test ECE for a
  model trained with light augmentation (BENCHMARKS.md, "Quality").
- ``temperature+bias``: a bias beside the temperature. A bias can undo what a temperature
  cannot (class weights that train on balanced classes, augmentation that shifts the inputs),
  and it also carries the validation split's prevalence into every score: right when validation
  is drawn like the data to be scored (a site's own recent cases), wrong otherwise.
- ``temperature+balanced-bias``: the same bias fitted with every class (for a sigmoid label:
  its positives and its negatives) weighted equally, whatever their counts in validation. It
  undoes a shift of the model's (stronger augmentation makes a model score clean images lower)
  and keeps validation's prevalence out: the scores are probabilities at equal class priors,
  the prior that training's class weights aim at. On PneumoniaMNIST it calibrated a model
  trained with strong augmentation (the default under 128 px) where the other forms did not
  (BENCHMARKS.md, "Quality").
- ``auto``: the bias only where 2-fold cross-fitting on validation (fit on one half, negative
  log-likelihood on the other, both ways round) says it saves more than ``MARGIN_NATS`` per
  bias parameter. Cross-fitting judges fit to validation, so it cannot see a prevalence shift
  after it.

The fits are maximum likelihood (the balanced one weighted) and contain the identity (T = 1,
bias 0), so none makes its own objective on validation worse than the raw scores.

Scores are the model's probabilities, so this works for any model, ours or a user's: the logits
are recovered from them (log p for softmax, up to a per-row constant that softmax ignores;
log(p / (1 - p)) for sigmoid). Dividing by T > 0 keeps every label's ranking, so AUROC is
unchanged; a per-class bias of a softmax model can reorder which class is on top.

Temperature alone: the negative log-likelihood is convex in 1 / T, so its minimum is the root of
a monotone derivative, found by bisection. Temperature and bias: the NLL is convex in (1 / T,
bias) too (a multinomial logistic regression on the logits), minimised by Newton's method
started from the temperature fit with a halving line search, so it never ends worse than it.
Only numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medray.workers import metrics
from medray.workers.errors import InputError

METHOD = "temperature scaling (Guo et al. 2017)"
TEMPERATURE, WITH_BIAS, BALANCED = "temperature", "temperature+bias", "temperature+balanced-bias"
CARD_FORMS = (TEMPERATURE, WITH_BIAS, BALANCED)  # the forms a card may hold
AUTO = "auto"  # a request, not a form: the form chosen by cross-fitting
FORMS = (*CARD_FORMS, AUTO)  # what --calibration-form accepts
BIASED = (WITH_BIAS, BALANCED)  # the forms with a bias
# the rule that gave each label its form, in words, by the training's form (given with
# --calibration-form, or the default for its recipe: TrainSpec.for_images)
SELECTION = {
    TEMPERATURE: "the training's form: temperature alone",
    WITH_BIAS: "the training's form: temperature and bias (temperature alone where a bias "
               "cannot be fitted)",
    BALANCED: "the training's form: temperature and bias with the classes weighted equally "
              "(temperature alone where a bias cannot be fitted)",
    AUTO: "2-fold cross-fitted NLL on the calibration split: the bias is kept when it lowers "
          "the summed held-out NLL by more than 2 nats per bias parameter"}
FOLDS = 2
# Nats of summed held-out NLL a bias parameter must save to be kept. Between two forms that fit
# equally well, cross-fitting still hands the bias a small win half the time by chance; in 150
# simulated splits each of 500 and 3,000 rows with no bias to find, that win passed 2 nats in
# under 5%, while a true bias of 0.5 on 524 rows saves about 11.
MARGIN_NATS = 2.0
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


def _mean_nll(u: np.ndarray, t: np.ndarray, w: np.ndarray | None = None) -> float:
    """Mean multinomial NLL of logits ``u`` against one-hot ``t`` (weighted by row: ``w``)."""
    top = u.max(axis=1)
    lse = top + np.log(np.exp(u - top[:, None]).sum(axis=1))
    return float(np.average(lse - (u * t).sum(axis=1), weights=w))


def balanced_weights(t: np.ndarray) -> np.ndarray:
    """A weight per row of one-hot ``t`` that gives every class present the same total weight
    (the rows' mean weight is 1)."""
    counts = t.sum(axis=0)
    present = counts > 0
    per_class = np.where(present, len(t) / (present.sum() * np.maximum(counts, 1)), 0.0)
    return t @ per_class


def fit_affine(z: np.ndarray, t: np.ndarray, temperature: float,
               weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """(T, bias per class, the first 0) minimising the NLL of softmax(z / T + bias) against
    one-hot ``t``, each row weighted by ``weights`` (None: equally); a sigmoid label is the
    two-class case with logits (0, z).

    Newton's method on theta = (1 / T, bias[1:]) (bias[0] = 0: softmax ignores a shared shift),
    from (1 / ``temperature``, 0), each step halved until the NLL does not rise.
    """
    z = np.asarray(z, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    n, k = z.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w * n / w.sum()  # mean 1: the weighted NLL keeps the plain one's scale
    # phi[i, c] = d u[i, c] / d theta: the logit for the scale, one-hot for the biases
    phi = np.zeros((n, k, k))
    phi[:, :, 0] = z
    phi[:, np.arange(1, k), np.arange(1, k)] = 1.0

    def logits(theta: np.ndarray) -> np.ndarray:
        return theta[0] * z + np.concatenate([[0.0], theta[1:]])

    theta = np.concatenate([[1.0 / temperature], np.zeros(k - 1)])
    loss = _mean_nll(logits(theta), t, w)
    for _ in range(100):
        p = _softmax(logits(theta))
        grad = np.einsum("n,nc,ncd->d", w, p - t, phi) / n
        mean_phi = np.einsum("nc,ncd->nd", p, phi)
        hess = (np.einsum("n,nc,ncd,nce->de", w, p, phi, phi)
                - (w[:, None] * mean_phi).T @ mean_phi) / n
        try:
            step = np.linalg.solve(hess + 1e-10 * np.eye(k), grad)
        except np.linalg.LinAlgError:
            break
        size = 1.0
        while size > 1e-6:
            cand = theta - size * step
            cand_loss = _mean_nll(logits(cand), t, w)
            if cand_loss <= loss:
                break
            size /= 2
        else:
            break  # no step lowers the NLL: at the optimum to float precision
        converged = loss - cand_loss < 1e-13
        theta, loss = cand, cand_loss
        if converged:
            break
    return 1.0 / float(theta[0]), np.concatenate([[0.0], theta[1:]])


def _two_class(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A sigmoid label as two classes: logits (0, z), one-hot (1 - y, y)."""
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    return np.stack([np.zeros_like(z), z], axis=1), np.stack([1 - y, y], axis=1)


def _folds(t: np.ndarray, folds: int) -> np.ndarray:
    """Fold of each row, stratified by true class, the same for the same targets."""
    rng = np.random.default_rng(0)
    out = np.zeros(len(t), dtype=int)
    for c in range(t.shape[1]):
        rows = np.flatnonzero(t[:, c] == 1)
        out[rng.permutation(rows)] = np.arange(len(rows)) % folds
    return out


def choose_form(z: np.ndarray, t: np.ndarray, folds: int = FOLDS
                ) -> tuple[str, dict[str, float]]:
    """(the form to fit, held-out mean NLL of each form) by ``folds``-fold cross-fitting on
    logits ``z`` (n, classes) and one-hot ``t``. Temperature-only unless the bias saves more
    than ``MARGIN_NATS`` per bias parameter, or when a fitting half lacks a class (its bias
    would run to minus infinity)."""
    fold = _folds(t, folds)
    totals = {TEMPERATURE: 0.0, WITH_BIAS: 0.0}  # held-out mean NLL over the whole split
    for f in range(folds):
        fit_rows, held = fold != f, fold == f
        if not held.any() or (t[fit_rows].sum(axis=0) == 0).any():
            return TEMPERATURE, {}
        temp = fit_softmax(z[fit_rows], t[fit_rows])  # any (n, classes) logits
        scale, bias = fit_affine(z[fit_rows], t[fit_rows], temp)
        if not scale > 0:  # an inverted scale is no calibration: never choose it
            return TEMPERATURE, {}
        share = held.sum() / len(t)
        totals[TEMPERATURE] += share * _mean_nll(z[held] / temp, t[held])
        totals[WITH_BIAS] += share * _mean_nll(z[held] / scale + bias, t[held])
    saved = (totals[TEMPERATURE] - totals[WITH_BIAS]) * len(t)
    form = WITH_BIAS if saved > MARGIN_NATS * (t.shape[1] - 1) else TEMPERATURE
    return form, {k: float(v) for k, v in totals.items()}


def _pick(z: np.ndarray, t: np.ndarray, asked: str) -> tuple[str, dict[str, float]]:
    """(the form to fit, held-out NLL by form) for logits ``z`` and one-hot ``t``: what was
    asked, cross-fitted for ``auto``; a bias needs both classes in ``t``."""
    if asked == AUTO:
        return choose_form(z, t)
    if asked in BIASED and (t.sum(axis=0) > 0).all():
        return asked, {}
    return TEMPERATURE, {}


def _affine_or_temperature(z: np.ndarray, t: np.ndarray, temp: float, form: str
                           ) -> tuple[str, float, np.ndarray]:
    """(form, T, bias) of the temperature-and-bias fit of ``form`` (one of ``BIASED``); the
    temperature alone when the fit inverts the scale (never a calibration)."""
    scale, bias = fit_affine(z, t, temp, balanced_weights(t) if form == BALANCED else None)
    if not (scale > 0 and math.isfinite(scale)) or not np.all(np.isfinite(bias)):
        return TEMPERATURE, temp, np.zeros(t.shape[1])
    return form, scale, bias


def fit_forms(scores: np.ndarray, y: np.ndarray, labels: Sequence[str], multi_label: bool,
              asked: str = TEMPERATURE) -> dict[str, dict[str, Any]]:
    """{temperature, bias, form, heldout_nll} per label, for the form ``asked`` (one of
    ``FORMS``; ``auto`` chooses by ``choose_form``), fitted on all of the split (softmax: one
    choice, one T, a bias per class)."""
    if asked not in FORMS:
        raise InputError(f"calibration form {asked!r}: use one of {', '.join(FORMS)}")
    z = to_logits(scores, multi_label)
    y = np.asarray(y, dtype=np.float64)
    out: dict[str, dict[str, Any]] = {
        "temperature": {}, "bias": {}, "form": {}, "heldout_nll": {}}
    if not multi_label:
        keep = y.sum(axis=1) == 1
        zk, tk = z[keep], y[keep]
        temp = fit_softmax(zk, tk)
        form, held = _pick(zk, tk, asked)
        bias = np.zeros(len(labels))
        if form in BIASED:
            form, temp, bias = _affine_or_temperature(zk, tk, temp, form)
        for j, label in enumerate(labels):
            out["temperature"][label], out["bias"][label] = temp, float(bias[j])
            out["form"][label], out["heldout_nll"][label] = form, held
        return out
    for j, label in enumerate(labels):
        temp, form, held, b = fit_sigmoid(z[:, j], y[:, j]), TEMPERATURE, {}, 0.0
        if not math.isfinite(temp):
            temp = 1.0  # one class: no finite optimum, keep the scores as they are
        else:
            z2, t2 = _two_class(z[:, j], y[:, j])
            form, held = _pick(z2, t2, asked)
            if form in BIASED:
                form, temp, both = _affine_or_temperature(z2, t2, temp, form)
                b = float(both[1])
        out["temperature"][label], out["bias"][label] = temp, b
        out["form"][label], out["heldout_nll"][label] = form, held
    return out


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


def apply(scores: np.ndarray, temperatures: Sequence[float], multi_label: bool,
          biases: Sequence[float] | None = None) -> np.ndarray:
    """Calibrated probabilities (float32) for raw ``scores`` (n, labels): logits / T + bias
    (no bias: temperature only); NaN rows stay NaN."""
    s = np.asarray(scores, dtype=np.float64)
    temps = np.asarray(temperatures, dtype=np.float64)
    bias = np.zeros_like(temps) if biases is None else np.asarray(biases, dtype=np.float64)
    if s.ndim != 2 or temps.shape != (s.shape[1],) or not np.all(temps > 0) \
            or bias.shape != temps.shape or not np.all(np.isfinite(bias)):
        raise InputError(f"need one positive temperature and one finite bias per score column, "
                         f"got {temps} and {bias} for scores of shape {s.shape}")
    bad = np.asarray(~np.isfinite(s).all(axis=1), dtype=bool)
    z = to_logits(np.where(bad[:, None], 0.5, s), multi_label) / temps + bias
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


def biases(card_calibration: Mapping[str, Any] | None, labels: Sequence[str]
           ) -> list[float] | None:
    """The biases a model card stores, in label order; None for a temperature-only card
    (cards written before the bias existed score exactly as they did)."""
    stored = (card_calibration or {}).get("bias")
    if not stored:
        return None
    return [float(stored.get(label, 0.0)) for label in labels]


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
              split: str, asked: str = TEMPERATURE) -> tuple[dict[str, Any], np.ndarray]:
    """Fit the form ``asked`` on ``split``'s scores and targets: (the model card's
    ``calibration``, calibrated scores). The card keeps the form each label got, the rule that
    gave it (with the held-out NLL for ``auto``), and ECE and NLL before and after, so the fit
    can be judged."""
    fitted = fit_forms(scores, y, labels, multi_label, asked)
    temps = fitted["temperature"]
    bias = [fitted["bias"][label] for label in labels]
    after = apply(scores, [temps[label] for label in labels], multi_label, bias)
    card = {"method": METHOD, "fitted_on": split, "images": int(len(y)),
            "shared": not multi_label, "temperature": temps, "bias": fitted["bias"],
            "form": fitted["form"], "asked": asked, "selection": SELECTION[asked],
            "heldout_nll": fitted["heldout_nll"], "bins": BINS,
            "ece_before": ece(y, scores, labels), "ece_after": ece(y, after, labels),
            "nll_before": nll(y, scores, multi_label), "nll_after": nll(y, after, multi_label)}
    return card, after


def apply_card(scores: np.ndarray, card_calibration: Mapping[str, Any] | None,
               labels: Sequence[str], multi_label: bool) -> np.ndarray:
    """A card's calibration applied to raw scores; the scores as they are without one."""
    temps = temperatures(card_calibration, labels)
    if temps is None:
        return np.asarray(scores, dtype=np.float32)
    return apply(scores, temps, multi_label, biases(card_calibration, labels))


def describe(card_calibration: Mapping[str, Any] | None) -> str:
    """A card's calibration in a few words, for reports: ``none``, ``temperature scaling``, or
    with the bias and, when only some labels have it, which."""
    if not (card_calibration or {}).get("temperature"):
        return "none"
    forms = dict((card_calibration or {}).get("form") or {})
    with_bias = sorted(label for label, form in forms.items() if form in BIASED)
    if not with_bias:
        return "temperature scaling"
    kind = "a class-balanced bias" if all(forms[label] == BALANCED for label in with_bias) \
        else "a bias"
    if len(with_bias) == len(forms):
        return f"temperature scaling with {kind}"
    return f"temperature scaling, with {kind} for {', '.join(with_bias)}"


def mean_ece(per_label: Mapping[str, float]) -> float:
    finite = [v for v in per_label.values() if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan
