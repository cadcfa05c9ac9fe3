"""Performance per patient group: AUROC, sensitivity and specificity with patient-level
bootstrap intervals for each value of an attribute (age band, sex, view position), and the
largest gap between two groups with its own interval, flagged when the interval excludes zero.

Attributes come from the dataset as staging kept them (``workers.attributes``: typed columns,
an age in whole years) or as older versions did: DICOM ages such as ``058Y``, or text.
``bands`` turns them into group names: ages into fixed bands, other numbers with many values
into quartiles, text as it is.

One bootstrap serves every group of an attribute: each resample draws patients from the whole
run, so a group's size varies as it would in a new sample, and the gap between two groups is
computed on the same resample (a paired comparison, not two independent intervals).

The largest gap is the best and the worst of k groups, picked after looking, so a plain 95%
interval of that one difference would exclude zero far more often than 5% of the time when the
groups do not differ at all. Its interval is a simultaneous one over all k(k-1)/2 pairs (the
bootstrap max-t band: each pair's difference over its bootstrap standard error, the 95%
quantile of the largest such deviation over pairs as the half-width in standard errors), so a
gap is flagged, interval excluding zero, in about 5% of attributes whose groups are alike
(``tests/unit/test_subgroups.py`` measures it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from medray.workers.attributes import AGE, kind_of
from medray.workers.bootstrap import resample_counts, units_of
from medray.workers.metrics import auroc, auroc_from_cum, cum_at_blocks, ranked, threshold_metrics

AGE_BANDS = (18, 40, 60, 80)  # years: <18, 18-39, 40-59, 60-79, >=80
# A group enters the "largest gap" comparison of a metric only with this many cases of the
# class the metric needs (positives for sensitivity, negatives for specificity, both for
# AUROC): a gap between a group of 3 and one of 300 says nothing but noise.
MIN_CASES = 10
METRICS = ("auroc", "sensitivity", "specificity")
# What a report breaks metrics down by when --subgroups is not given, where the dataset has it
USUAL = ("age", "sex", "gender", "view position")
_DICOM_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def normalise(name: str) -> str:
    """'Patient Age', 'patient_age' and 'PatientAge' are one attribute."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def find_key(wanted: str, keys: Sequence[str]) -> str | None:
    """The attribute key that ``wanted`` names: equal once normalised, else the one key that
    ends with it or that it ends with ('age' finds 'Patient Age')."""
    w = normalise(wanted)
    exact = [k for k in keys if normalise(k) == w]
    if exact:
        return exact[0]
    near = [k for k in keys if len(normalise(k)) >= 3 and len(w) >= 3
            and (normalise(k).endswith(w) or w.endswith(normalise(k)))]
    return near[0] if len(near) == 1 else None


def _age_years(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int | float):
        return float(v) if math.isfinite(v) and v >= 0 else None
    text = str(v).strip()
    m = _DICOM_AGE.match(text)
    if m:
        return int(m.group(1)) * _AGE_UNIT_YEARS[m.group(2).upper()]
    try:
        years = float(text)
    except ValueError:
        return None
    return years if math.isfinite(years) and years >= 0 else None


def _age_band(years: float) -> str:
    lo = 0
    for edge in AGE_BANDS:
        if years < edge:
            return f"{lo}-{edge - 1}" if lo else f"<{edge}"
        lo = edge
    return f">={AGE_BANDS[-1]}"


def bands(name: str, values: Sequence[Any]) -> np.ndarray:
    """Group name per row (object array; None where the value is missing)."""
    out = np.full(len(values), None, dtype=object)
    if kind_of(name) == AGE:  # a word of the name is "age" ("Image Index" is not an age)
        for i, v in enumerate(values):
            years = _age_years(v)
            out[i] = _age_band(years) if years is not None else None
        return out
    numbers = []
    for v in values:
        try:
            numbers.append(float(v) if v is not None and str(v).strip() != "" else math.nan)
        except (TypeError, ValueError):
            numbers = []
            break
    nums = np.array(numbers, dtype=np.float64)
    finite = nums[np.isfinite(nums)] if len(numbers) else nums
    if len(numbers) and finite.size and len(np.unique(finite)) > 12:
        edges = np.unique(np.quantile(finite, [0.25, 0.5, 0.75]))
        labels = [f"<{edges[0]:g}", *(f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:],
                                                                    strict=True)),
                  f">={edges[-1]:g}"]
        for i, x in enumerate(nums):
            if math.isfinite(x):
                out[i] = labels[int(np.searchsorted(edges, x, side="right"))]
        return out
    for i, v in enumerate(values):
        text = "" if v is None else str(v).strip()
        out[i] = text or None
    return out


def _quantiles(v: np.ndarray, alpha: float) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan, math.nan
    lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _simultaneous(boot: np.ndarray, point: np.ndarray, i: int, j: int, alpha: float
                  ) -> tuple[float, float]:
    """Interval of point[i] - point[j] that holds for every pair of groups at once: the
    bootstrap max-t band over all pairs of columns of ``boot`` (resamples x groups)."""
    boot = boot[np.isfinite(boot).all(axis=1)]
    k = boot.shape[1]
    if len(boot) < 2:
        return math.nan, math.nan
    a, b = np.triu_indices(k, 1)
    diffs = boot[:, a] - boot[:, b]
    se = diffs.std(axis=0, ddof=1)
    if not np.all(se > 0):
        return math.nan, math.nan
    t = np.abs(diffs - (point[a] - point[b])) / se
    q = float(np.quantile(t.max(axis=1), 1 - alpha))
    pair = int(np.flatnonzero(((a == i) & (b == j)) | ((a == j) & (b == i)))[0])
    gap = float(point[i] - point[j])
    return gap - q * float(se[pair]), gap + q * float(se[pair])


def analyse(label: str, attribute: str, group: np.ndarray, y: np.ndarray, s: np.ndarray,
            threshold: float, patients: np.ndarray | None, n_boot: int, alpha: float = 0.05,
            seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(one row per group, one gap row per metric) for a label's rows with ground truth.

    ``group`` names each row's group (None: unknown, left out); ``patients`` the bootstrap
    unit of each row (None: the rows themselves).
    """
    y = np.asarray(y, dtype=bool)
    s = np.asarray(s, dtype=np.float64)
    known = np.array([g is not None for g in group], dtype=bool)
    names = sorted({str(g) for g in group[known]})
    unit, n_units = units_of(patients, len(y))
    members = {g: np.flatnonzero(known & (group == g)) for g in names}
    pred = s >= threshold
    rows, points = [], {}
    for g, idx in members.items():
        yg, sg = y[idx], s[idx]
        pos = int(yg.sum())
        tm = threshold_metrics(yg, sg, threshold)
        point = {"auroc": auroc(yg, sg) if 0 < pos < len(idx) else math.nan,
                 "sensitivity": tm["sensitivity"], "specificity": tm["specificity"]}
        points[g] = point
        rows.append({"label": label, "attribute": attribute, "group": g, "images": int(len(idx)),
                     "positives": pos, "negatives": int(len(idx) - pos), "threshold": threshold,
                     **point})
    boot: dict[str, dict[str, np.ndarray]] = {g: {} for g in names}
    if n_boot > 0 and n_units:
        prepared = {}
        per_unit = {}
        for g, idx in members.items():
            order, ys, last = ranked(y[idx], s[idx])
            prepared[g] = (unit[idx][order], ys, last)
            cells = [pred[idx] & y[idx], ~pred[idx] & y[idx], ~pred[idx] & ~y[idx],
                     pred[idx] & ~y[idx]]
            per_unit[g] = np.stack([np.bincount(unit[idx], weights=c.astype(np.float64),
                                                minlength=n_units) for c in cells], axis=1)
        chunks: dict[str, dict[str, list[np.ndarray]]] = {g: {m: [] for m in METRICS}
                                                          for g in names}
        for counts in resample_counts(n_units, n_boot, seed, cells=500_000):
            for g in names:
                cols, ys, last = prepared[g]
                with np.errstate(invalid="ignore", divide="ignore"):
                    if ys.any() and not ys.all():
                        cpos, cneg = cum_at_blocks(counts[:, cols], ys, last)
                        chunks[g]["auroc"].append(auroc_from_cum(cpos, cneg))
                    tp, fn, tn, fp = (counts @ per_unit[g]).T
                    chunks[g]["sensitivity"].append(tp / (tp + fn))
                    chunks[g]["specificity"].append(tn / (tn + fp))
        for g in names:
            for m in METRICS:
                boot[g][m] = (np.concatenate(chunks[g][m]) if chunks[g][m]
                              else np.full(n_boot, math.nan))
    for row in rows:
        for m in METRICS:
            v = boot[row["group"]].get(m)
            row[f"{m}_lo"], row[f"{m}_hi"] = _quantiles(v, alpha) if v is not None \
                else (math.nan, math.nan)
    gaps = []
    for m in METRICS:
        need = {"auroc": ("positives", "negatives"), "sensitivity": ("positives",),
                "specificity": ("negatives",)}[m]
        eligible = [r for r in rows if all(r[k] >= MIN_CASES for k in need)
                    and math.isfinite(r[m])]
        gap: dict[str, Any] = {"label": label, "attribute": attribute, "metric": m,
                               "groups": len(eligible), "min_cases": MIN_CASES}
        if len(eligible) < 2:
            gap.update(high=None, low=None, gap=math.nan, gap_lo=math.nan, gap_hi=math.nan,
                       flagged=False)
            gaps.append(gap)
            continue
        high = max(eligible, key=lambda r: r[m])
        low = min(eligible, key=lambda r: r[m])
        lo, hi = (math.nan, math.nan)
        if n_boot > 0:
            lo, hi = _simultaneous(np.stack([boot[r["group"]][m] for r in eligible], axis=1),
                                   np.array([r[m] for r in eligible]), eligible.index(high),
                                   eligible.index(low), alpha)
        gap.update(high=high["group"], low=low["group"], gap=high[m] - low[m], gap_lo=lo,
                   gap_hi=hi, flagged=bool(math.isfinite(lo) and lo > 0))
        gaps.append(gap)
    return rows, gaps
