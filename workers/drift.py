"""Drift of a score distribution between two runs: PSI, KS, and a flag that needs both.

Without ground truth (nightly scoring) a shift in a label's scores is the first sign that the
inputs or the model changed. Numpy and scipy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

from medray.workers.errors import InputError
from medray.workers.metrics import as_scores, check_n_bins

# PSI takes log(p/q): an empty bin would give infinity, so proportions are floored here.
_PSI_EPS = 1e-4


def _two_samples(
    reference: npt.ArrayLike, current: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    ref, cur = as_scores(reference, "reference"), as_scores(current, "current")
    if ref.size == 0 or cur.size == 0:
        raise InputError(
            f"drift needs values on both sides, got {ref.size} reference and {cur.size} current"
        )
    return ref, cur


def psi(reference: npt.ArrayLike, current: npt.ArrayLike, n_bins: int = 10) -> float:
    """Population stability index on the reference's quantile bins.

    Quantile bins give each reference bin the same mass, so no bin is starved; tied quantiles
    (a score stuck at 0) merge bins. Proportions are floored at 1e-4 so an empty bin counts as
    a large shift instead of an infinite one.
    """
    n_bins = check_n_bins(n_bins)
    ref, cur = _two_samples(reference, current)
    inner = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, n_bins + 1)[1:-1]))
    k = inner.size + 1
    p = np.bincount(np.searchsorted(inner, ref, side="right"), minlength=k) / ref.size
    q = np.bincount(np.searchsorted(inner, cur, side="right"), minlength=k) / cur.size
    p, q = np.maximum(p, _PSI_EPS), np.maximum(q, _PSI_EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def ks(reference: npt.ArrayLike, current: npt.ArrayLike) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and two-sided p-value."""
    ref, cur = _two_samples(reference, current)
    res = stats.ks_2samp(ref, cur)
    return float(res.statistic), float(res.pvalue)


def drift_flags(
    reference: npt.ArrayLike,
    current: npt.ArrayLike,
    psi_threshold: float = 0.2,
    ks_pvalue: float = 0.01,
) -> dict[str, Any]:
    """Flag drift only when the shift is both large (PSI) and not sampling noise (KS).

    Either test alone misfires: on a nightly run of 100k images KS rejects shifts too small to
    matter, and on a batch of 50 images PSI exceeds 0.2 by chance alone.
    """
    value = psi(reference, current)
    stat, pvalue = ks(reference, current)
    return {
        "psi": value,
        "ks": stat,
        "ks_pvalue": pvalue,
        "drifted": bool(value > psi_threshold and pvalue < ks_pvalue),
    }
