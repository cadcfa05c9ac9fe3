"""Metrics for binary scores: discrimination, operating points and calibration.

Numpy only, so every actor can import it cheaply; scikit-learn is the reference in the tests,
not a dependency here. The same family of modules holds the bootstrap intervals
(``workers/bootstrap.py``), drift (``workers/drift.py``) and the mergeable per-label summary
(``workers/streaming.py``); they build on the input checks and the ranking core below, which
are public for that reason.

Conventions shared by every function:
- ``y_true`` holds 0/1 (or bool) and ``y_score`` finite floats, row for row; anything else is an
  ``InputError`` naming the fix, because a silently coerced label makes every number wrong.
- A row is predicted positive when ``score >= threshold``.
- A value that is undefined on the data (one class only, a zero denominator) is ``nan`` rather
  than an exception, so a report over a thin subgroup still renders and says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from medray.workers.errors import InputError

MetricFn = Callable[[np.ndarray, np.ndarray], float]
# The rates ``threshold_metrics`` returns that have a bootstrap interval in the report.
RATES = ("sensitivity", "specificity", "ppv", "npv", "f1")


# --------------------------------------------------------------------------- input checks


def as_labels(y_true: npt.ArrayLike, name: str = "y_true") -> np.ndarray:
    """0/1 or bool labels as a bool array; anything else is an ``InputError``."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise InputError(f"{name} must be a 1-D array, got shape {y.shape}")
    if y.dtype == bool:
        return y
    if not np.issubdtype(y.dtype, np.number):
        raise InputError(
            f"{name} must hold 0 (negative) and 1 (positive), got dtype {y.dtype}; "
            "map the labels to 0/1 first"
        )
    ok = (y == 0) | (y == 1)
    if not ok.all():
        bad = np.unique(y[~ok])[:5].tolist()
        raise InputError(
            f"{name} must hold only 0 and 1, found {bad}; map labels to 0/1 and drop "
            "unlabelled rows (NaN) before computing metrics"
        )
    return y == 1


def as_scores(y_score: npt.ArrayLike, name: str = "y_score") -> np.ndarray:
    """Finite scores as a float64 array; NaN or infinity is an ``InputError``."""
    try:
        s = np.asarray(y_score, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be numeric: {exc}") from exc
    if s.ndim != 1:
        raise InputError(f"{name} must be a 1-D array, got shape {s.shape}")
    bad = ~np.isfinite(s)
    if bad.any():
        rows = np.flatnonzero(bad)[:5].tolist()
        raise InputError(
            f"{name} has {int(bad.sum())} NaN or infinite values (rows {rows}...); "
            "drop or fix those rows before computing metrics"
        )
    return s


def as_unit_scores(y_score: npt.ArrayLike, name: str = "y_score") -> np.ndarray:
    """``as_scores`` that must also lie in [0, 1] (binned on that range)."""
    s = as_scores(y_score, name)
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise InputError(
            f"{name} must be probabilities in [0, 1], found range [{s.min():g}, {s.max():g}]; "
            "apply the model's sigmoid/softmax first"
        )
    return s


def as_pair(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Checked labels and scores of the same length."""
    y, s = as_labels(y_true), as_scores(y_score)
    if y.shape[0] != s.shape[0]:
        raise InputError(
            f"y_true has {y.shape[0]} rows but y_score has {s.shape[0]}; "
            "they must be aligned row for row"
        )
    return y, s


def bin_index(s: np.ndarray, n_bins: int) -> np.ndarray:
    """The equal-width bin of [0, 1] each score falls in."""
    # Edges k/n_bins are correctly rounded, so a score equal to a decimal threshold such as 0.57
    # lands in the bin that starts there; 1.0 belongs to the last bin.
    edges = np.arange(n_bins + 1) / n_bins
    idx = np.searchsorted(edges, s, side="right") - 1
    return np.minimum(idx, n_bins - 1)


def check_n_bins(n_bins: int) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise InputError(f"n_bins must be a positive integer, got {n_bins!r}")
    return int(n_bins)


# --------------------------------------------------------------------------- ranking core


def ranked(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Order rows by descending score: (that order, the labels in it, the last row of each tie
    block)."""
    order = np.argsort(s, kind="stable")[::-1]
    ss = s[order]
    last = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True])
    return order, y[order], last


def cum_at_blocks(
    w_sorted: np.ndarray, y_sorted: np.ndarray, last: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative positive and negative weight at each tie block, per row of ``w_sorted``."""
    cpos = np.cumsum(w_sorted * y_sorted, axis=1)[:, last]
    call = np.cumsum(w_sorted, axis=1)[:, last]
    return cpos, call - cpos


def auroc_from_cum(cpos: np.ndarray, cneg: np.ndarray) -> np.ndarray:
    """AUROC per row of cumulative weights (from ``cum_at_blocks``)."""
    # Mann-Whitney U with ties counted one half, i.e. the average-rank statistic, written per tie
    # block so that integer weights (bootstrap counts) give exactly the resampled value.
    p, n = cpos[:, -1], cneg[:, -1]
    pk = np.diff(cpos, axis=1, prepend=0.0)
    nk = np.diff(cneg, axis=1, prepend=0.0)
    u = (pk * (n[:, None] - cneg + 0.5 * nk)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return u / (p * n)


def ap_from_cum(cpos: np.ndarray, cneg: np.ndarray) -> np.ndarray:
    """Average precision per row of cumulative weights (from ``cum_at_blocks``)."""
    # sklearn's step-wise average precision: sum over thresholds of recall gain x precision.
    p = cpos[:, -1]
    pk = np.diff(cpos, axis=1, prepend=0.0)
    called = cpos + cneg
    prec = np.divide(cpos, called, out=np.zeros_like(cpos), where=called > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.maximum((pk * prec).sum(axis=1) / p, 0.0)


def _counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positives at each distinct score, highest threshold first."""
    if s.size == 0:
        raise InputError("need at least one row to build a curve")
    order, ys, last = ranked(y, s)
    tps = np.cumsum(ys)[last].astype(np.float64)
    fps = (last + 1) - tps
    return tps, fps, s[order][last]


# --------------------------------------------------------------------------- discrimination


def auroc(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> float:
    """Area under the ROC curve; ties count one half. ``nan`` unless both classes are present."""
    y, s = as_pair(y_true, y_score)
    if s.size == 0:
        return math.nan
    order, ys, last = ranked(y, s)
    cpos, cneg = cum_at_blocks(np.ones((1, s.size)), ys, last)
    return float(auroc_from_cum(cpos, cneg)[0])


def auprc(y_true: npt.ArrayLike, y_score: npt.ArrayLike) -> float:
    """Average precision as sklearn defines it (no interpolation): ``nan`` without positives.

    Not the trapezoidal area under the PR curve, which is optimistic for imbalanced findings.
    """
    y, s = as_pair(y_true, y_score)
    if s.size == 0:
        return math.nan
    order, ys, last = ranked(y, s)
    cpos, cneg = cum_at_blocks(np.ones((1, s.size)), ys, last)
    return float(ap_from_cum(cpos, cneg)[0])


def roc_curve(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, as sklearn with drop_intermediate=False.

    The first threshold is ``inf`` (nothing called positive) so the curve starts at (0, 0).
    A rate whose class is absent is ``nan``.
    """
    y, s = as_pair(y_true, y_score)
    tps, fps, thr = _counts(y, s)
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fps / fps[-1]
        tpr = tps / tps[-1]
    return fpr, tpr, np.r_[np.inf, thr]


def pr_curve(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) laid out as sklearn's ``precision_recall_curve``.

    Thresholds ascend; precision and recall have one more entry, the (1, 0) end point.
    Without positives recall is ``nan`` (sklearn sets it to 1 with a warning).
    """
    y, s = as_pair(y_true, y_score)
    tps, fps, thr = _counts(y, s)
    precision = tps / (tps + fps)  # every threshold is an observed score, so never 0/0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1].copy()


# --------------------------------------------------------------------------- operating points


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def threshold_metrics(
    y_true: npt.ArrayLike, y_score: npt.ArrayLike, threshold: float
) -> dict[str, Any]:
    """Confusion counts and rates at ``score >= threshold``; an undefined rate is ``nan``."""
    y, s = as_pair(y_true, y_score)
    if not math.isfinite(threshold):
        raise InputError(f"threshold must be a finite number, got {threshold!r}")
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    tn = int(s.size) - tp - fp - fn
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, s.size),
    }


def best_threshold(y_true: npt.ArrayLike, y_score: npt.ArrayLike, method: str = "youden") -> float:
    """Operating point chosen on validation data, to be frozen and reused on test data.

    Returns an observed score, so ``threshold_metrics`` at it reproduces the optimum exactly.
    Among equally good points the highest threshold wins (fewest false alarms).
    """
    y, s = as_pair(y_true, y_score)
    if method not in ("youden", "f1"):
        raise InputError(f"method must be 'youden' or 'f1', got {method!r}")
    n_pos = int(np.count_nonzero(y))
    n_neg = int(s.size) - n_pos
    if n_pos == 0 or (method == "youden" and n_neg == 0):
        raise InputError(
            f"cannot choose a {method} threshold: the validation labels hold "
            f"{n_pos} positives and {n_neg} negatives; both classes are needed"
        )
    tps, fps, thr = _counts(y, s)
    objective = tps / n_pos - fps / n_neg if method == "youden" else 2 * tps / (tps + fps + n_pos)
    return float(thr[int(np.argmax(objective))])


# --------------------------------------------------------------------------- calibration


def calibration(y_true: npt.ArrayLike, y_score: npt.ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """Reliability table on equal-width bins and the count-weighted expected calibration error.

    Empty bins keep their place with ``None`` means (JSON-safe) so plots share an x axis.
    """
    n_bins = check_n_bins(n_bins)
    y = as_labels(y_true)
    s = as_unit_scores(y_score)
    if y.shape[0] != s.shape[0]:
        raise InputError(f"y_true has {y.shape[0]} rows but y_score has {s.shape[0]}")
    idx = bin_index(s, n_bins)
    count = np.bincount(idx, minlength=n_bins)
    sum_score = np.bincount(idx, weights=s, minlength=n_bins)
    sum_pos = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    # |sum of labels - sum of scores| per bin is count x |frac_positive - mean_score|.
    gap = np.abs(sum_pos - sum_score).sum()
    bins = []
    for k in range(n_bins):
        c = int(count[k])
        bins.append(
            {
                "lo": k / n_bins,
                "hi": (k + 1) / n_bins,
                "count": c,
                "mean_score": float(sum_score[k] / c) if c else None,
                "frac_positive": float(sum_pos[k] / c) if c else None,
            }
        )
    return {"ece": float(gap / s.size) if s.size else math.nan, "bins": bins}
