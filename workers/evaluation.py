"""The report's numbers from merged run data: exact metrics per label with patient-level 95%
bootstrap intervals, calibration (ECE with its interval) and curve points for the plots, the
rates at each operating point the model card stores, metrics per patient subgroup with the
largest gap, drift against a reference run, a paired AUROC comparison with another run, and
the job result's ``metrics``.

``build_report`` takes a ``map_fn`` that runs the per-label calls: serially by default (unit
tests), as one Ray task per label in the report job. Pure numpy; each number is checked against
scikit-learn in the unit tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medray.workers import metrics, subgroups
from medray.workers.bootstrap import bootstrap_ci, ece_ci, paired_bootstrap_diff, threshold_ci
from medray.workers.drift import drift_flags
from medray.workers.jsonsafe import json_safe
from medray.workers.metrics import RATES
from medray.workers.run_data import RunData, pair_rows

PLOT_BINS = 20  # score histogram in the HTML
CAL_BINS = 10  # reliability diagram and ECE
MAX_CURVE_POINTS = 400  # per ROC/PR curve in the HTML; the tables keep the exact values
ALPHA = 0.05  # 95% intervals
# Column order of a label's exact metrics, the same whether or not there is ground truth.
_ROW_KEYS = ("with_truth", "positives", "negatives", "prevalence", "tp", "fp", "tn", "fn",
             "auroc", "auroc_lo", "auroc_hi", "auprc", "auprc_lo", "auprc_hi",
             *(f"{m}{suffix}" for m in RATES for suffix in ("", "_lo", "_hi")),
             "accuracy", "ece", "ece_lo", "ece_hi")
# What the job result's ``metrics`` takes from the drift and comparison rows.
_RESULT_EXTRAS = ("psi", "ks", "ks_pvalue", "drifted", "compare_auroc", "auroc_diff",
                  "auroc_diff_lo", "auroc_diff_hi", "auroc_diff_p")

# Runs one function over keyword-argument dicts and returns the results in call order.
MapFn = Callable[[Callable[..., Any], list[dict[str, Any]]], list[Any]]


def _thin(x: np.ndarray, y: np.ndarray, limit: int = MAX_CURVE_POINTS) -> dict[str, list[float]]:
    """At most ``limit`` points of a curve, always keeping both ends."""
    if x.size > limit:
        keep = np.unique(np.r_[np.linspace(0, x.size - 1, limit).round().astype(int)])
        x, y = x[keep], y[keep]
    return {"x": [float(v) for v in x], "y": [float(v) for v in y]}


def label_metrics(y: np.ndarray, s: np.ndarray, threshold: float, groups: np.ndarray | None,
                  n_boot: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Exact metrics of one label on its rows with ground truth -> (table row, plot data).

    Undefined values (one class only, zero denominators) are NaN. Intervals are 95% percentile
    bootstrap intervals resampling ``groups`` (patients; None = images).
    """
    y = np.asarray(y, dtype=bool)
    s = np.asarray(s, dtype=np.float64)
    n, pos = int(y.size), int(y.sum())
    nan = math.nan
    row: dict[str, Any] = {"with_truth": n, "positives": pos, "negatives": n - pos,
                           "prevalence": pos / n if n else nan}
    plots: dict[str, Any] = {"roc": None, "pr": None, "calibration": None, "op": None}
    if n == 0:
        row.update(dict.fromkeys(("tp", "fp", "tn", "fn")))
        return {k: row.get(k, nan) for k in _ROW_KEYS}, plots
    both = 0 < pos < n
    tm = metrics.threshold_metrics(y, s, threshold)
    row.update(tm)
    row["auroc"] = metrics.auroc(y, s) if both else nan
    row["auprc"] = metrics.auprc(y, s) if pos else nan
    boot = n_boot > 0 and both
    for name, fn in (("auroc", metrics.auroc), ("auprc", metrics.auprc)):
        if boot:
            _, lo, hi = bootstrap_ci(fn, y, s, groups=groups, n_boot=n_boot, alpha=ALPHA,
                                     seed=seed)
        else:
            lo = hi = nan
        row[f"{name}_lo"], row[f"{name}_hi"] = lo, hi
    cis = threshold_ci(y, s, threshold, groups, n_boot if boot else 0, ALPHA, seed)
    for name in RATES:
        row[f"{name}_lo"], row[f"{name}_hi"] = cis[name]
    cal = metrics.calibration(y, s, CAL_BINS)
    row["ece"] = cal["ece"]
    row["ece_lo"], row["ece_hi"] = ece_ci(y, s, groups, n_boot if n_boot > 0 else 0, CAL_BINS,
                                          ALPHA, seed)
    plots["calibration"] = cal["bins"]
    fpr_op = tm["fp"] / (tm["fp"] + tm["tn"]) if tm["fp"] + tm["tn"] else nan
    plots["op"] = {"fpr": fpr_op, "tpr": tm["sensitivity"], "recall": tm["sensitivity"],
                   "precision": tm["ppv"], "threshold": float(threshold)}
    if both:
        fpr, tpr, _ = metrics.roc_curve(y, s)
        plots["roc"] = _thin(fpr, tpr)
        precision, recall, _ = metrics.pr_curve(y, s)
        plots["pr"] = _thin(recall[::-1], precision[::-1])
    return {k: row[k] for k in _ROW_KEYS}, plots


def operating_rows(label: str, y: np.ndarray, s: np.ndarray, points: Sequence[dict[str, Any]],
                   groups: np.ndarray | None, n_boot: int, seed: int = 0
                   ) -> list[dict[str, Any]]:
    """Sensitivity, specificity, PPV, NPV and F1 with 95% bootstrap intervals (resampling
    ``groups``) at each stored operating point of one label; ``points`` are dicts with rule,
    threshold and primary (a model card's ``operating_points``)."""
    y = np.asarray(y, dtype=bool)
    s = np.asarray(s, dtype=np.float64)
    rows = []
    for p in points:
        t = float(p["threshold"])
        row: dict[str, Any] = {"label": label, "rule": p["rule"], "primary": bool(p["primary"]),
                               "threshold": t, "with_truth": int(y.size)}
        if y.size:
            at = metrics.threshold_metrics(y, s, t)
            row.update({k: at[k] for k in ("tp", "fp", "tn", "fn", *RATES)})
        else:
            row.update(dict.fromkeys(("tp", "fp", "tn", "fn", *RATES)))
        boot = n_boot if y.size and 0 < y.sum() < y.size else 0
        for name, (lo, hi) in threshold_ci(y, s, t, groups, boot, ALPHA, seed).items():
            row[f"{name}_lo"], row[f"{name}_hi"] = lo, hi
        rows.append(row)
    return rows


def label_report(y: np.ndarray, s: np.ndarray, threshold: float, groups: np.ndarray | None,
                 n_boot: int, label: str = "", points: Sequence[dict[str, Any]] = (),
                 attributes: dict[str, np.ndarray] | None = None, seed: int = 0
                 ) -> dict[str, Any]:
    """Everything of one label (one task in the report job): the metrics row and plot data of
    ``label_metrics``, the rows at each operating point, and per attribute the subgroup rows
    and the largest gaps (``workers/subgroups.py``) at ``threshold``."""
    row, plots = label_metrics(y, s, threshold, groups, n_boot, seed)
    sub: list[dict[str, Any]] = []
    gaps: list[dict[str, Any]] = []
    for name, bands in (attributes or {}).items():
        rows, found = subgroups.analyse(label, name, bands, y, s, threshold, groups, n_boot,
                                        ALPHA, seed)
        sub.extend(rows)
        gaps.extend(found)
    return {"row": row, "plots": plots, "subgroups": sub, "gaps": gaps,
            "operating": operating_rows(label, y, s, points, groups, n_boot, seed)}


def drift_rows(cur: RunData, ref: RunData, psi_threshold: float) -> list[dict[str, Any]]:
    """PSI and KS per label shared by both runs; ``drifted`` when PSI > threshold and KS p < 0.01.

    Both runs' positive rates are taken at the current run's threshold, so they are comparable.
    """
    rows = []
    for j, label in enumerate(cur.labels):
        if label not in ref.labels:
            continue
        a = cur.scores[:, j].astype(np.float64)
        b = ref.scores[:, ref.label_index(label)].astype(np.float64)
        thr = cur.thresholds[j]
        row: dict[str, Any] = {"label": label, "images": int(a.size),
                               "reference_images": int(b.size), "psi_threshold": psi_threshold,
                               "positive_rate": float(np.mean(a >= thr)) if a.size else math.nan,
                               "reference_positive_rate":
                                   float(np.mean(b >= thr)) if b.size else math.nan,
                               "mean_score": float(a.mean()) if a.size else math.nan,
                               "reference_mean_score": float(b.mean()) if b.size else math.nan}
        if a.size and b.size:
            row.update(drift_flags(b, a, psi_threshold=psi_threshold))
        else:
            row.update({"psi": math.nan, "ks": math.nan, "ks_pvalue": math.nan, "drifted": None})
        rows.append(row)
    return rows


def compare_rows(cur: RunData, other: RunData, groups: np.ndarray | None, n_boot: int,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Paired bootstrap of AUROC(current) - AUROC(other) on the images both runs scored."""
    mine, theirs = pair_rows(cur, other)
    rows = []
    for j, label in enumerate(cur.labels):
        if label not in other.labels:
            continue
        y = cur.y[mine, j]
        a = cur.scores[mine, j].astype(np.float64)
        b = other.scores[theirs, other.label_index(label)].astype(np.float64)
        g = groups[mine] if groups is not None else None
        row: dict[str, Any] = {"label": label, "paired_images": int(mine.size),
                               "positives": int(y.sum())}
        d: dict[str, float]
        if 0 < y.sum() < y.size:
            if n_boot > 0:
                d = paired_bootstrap_diff(metrics.auroc, y, a, b, groups=g, n_boot=n_boot,
                                          alpha=ALPHA, seed=seed)
            else:
                ra, rb = metrics.auroc(y, a), metrics.auroc(y, b)
                d = {"a": ra, "b": rb, "diff": ra - rb, "lo": math.nan, "hi": math.nan,
                     "p_value": math.nan}
        else:
            d = dict.fromkeys(("a", "b", "diff", "lo", "hi", "p_value"), math.nan)
        row.update({"auroc": d["a"], "compare_auroc": d["b"], "auroc_diff": d["diff"],
                    "auroc_diff_lo": d["lo"], "auroc_diff_hi": d["hi"],
                    "auroc_diff_p": d["p_value"]})
        rows.append(row)
    return rows


@dataclass
class Report:
    """Every table of a report (rows as dicts) and the plot data per label."""

    per_label: list[dict[str, Any]]
    thresholds: list[dict[str, Any]]
    calibration: list[dict[str, Any]]
    drift: list[dict[str, Any]] | None
    compare: list[dict[str, Any]] | None
    plots: dict[str, dict[str, Any]] = field(default_factory=dict)
    operating: list[dict[str, Any]] = field(default_factory=list)
    subgroups: list[dict[str, Any]] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)


def serial_map(fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
    """The ``MapFn`` of the unit tests: every call in this process, in order."""
    return [fn(**kw) for kw in calls]


def build_report(cur: RunData, groups: np.ndarray | None, n_boot: int,
                 threshold_sources: Sequence[str] | None = None,
                 reference: RunData | None = None, compare: RunData | None = None,
                 drift_psi: float = 0.2, map_fn: MapFn = serial_map,
                 points: Sequence[dict[str, Any]] | None = None,
                 attributes: dict[str, np.ndarray] | None = None) -> Report:
    """All tables of a report from merged run data. ``map_fn`` runs the ``label_report``
    calls; ``groups`` gives each kept row its bootstrap unit. ``points`` are the model card's
    operating points (default: the run's threshold per label); ``attributes`` the subgroup
    name of every kept row, per attribute.
    """
    known = np.flatnonzero(cur.known)
    if groups is not None:
        # Integer codes: cheaper to ship to the label tasks and to factorise again in each
        # bootstrap than patient-key strings; the grouping is the same.
        groups = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    g_known = groups[known] if groups is not None else None
    sources = list(threshold_sources or ["given"] * len(cur.labels))
    if points is None:
        points = [{"label": lab, "rule": sources[j], "threshold": cur.thresholds[j],
                   "primary": True} for j, lab in enumerate(cur.labels)]
    attrs = {name: np.asarray(values, dtype=object)[known]
             for name, values in (attributes or {}).items()}
    calls = [{"y": cur.y[known, j], "s": cur.scores[known, j], "threshold": cur.thresholds[j],
              "groups": g_known, "n_boot": n_boot, "label": label,
              "points": [p for p in points if p["label"] == label], "attributes": attrs}
             for j, label in enumerate(cur.labels)]
    results = map_fn(label_report, calls)
    per_label, thresholds, calibration, plots = [], [], [], {}
    operating, sub, gaps = [], [], []
    for j, label in enumerate(cur.labels):
        exact, label_plots = results[j]["row"], results[j]["plots"]
        operating.extend(results[j]["operating"])
        sub.extend(results[j]["subgroups"])
        gaps.extend(results[j]["gaps"])
        st = cur.stats[j]
        images = st.count
        row = {"label": label, "images": images, "threshold": cur.thresholds[j],
               "positive_rate": int(cur.above[j]) / images if images else math.nan,
               "mean_score": st.mean_score, **exact}
        per_label.append(row)
        thresholds.append({"label": label, "threshold": cur.thresholds[j],
                           "source": sources[j], "positive_rate": row["positive_rate"],
                           "sensitivity": exact["sensitivity"],
                           "specificity": exact["specificity"], "ppv": exact["ppv"]})
        for k, b in enumerate(label_plots["calibration"] or []):
            calibration.append({"label": label, "bin": k, **b})
        label_plots["histogram"] = st.histogram(PLOT_BINS)
        if reference is not None and label in reference.labels:
            label_plots["reference_histogram"] = \
                reference.stats[reference.label_index(label)].histogram(PLOT_BINS)
        plots[label] = label_plots
    drift = drift_rows(cur, reference, drift_psi) if reference is not None else None
    cmp = compare_rows(cur, compare, groups, n_boot) if compare is not None else None
    return Report(per_label=per_label, thresholds=thresholds, calibration=calibration,
                  drift=drift, compare=cmp, plots=plots, operating=operating, subgroups=sub,
                  gaps=gaps)


def result_metrics(report: Report) -> dict[str, dict[str, Any]]:
    """The job result's ``metrics``: per label, the table row plus drift and comparison."""
    out: dict[str, dict[str, Any]] = {}
    for row in report.per_label:
        out[row["label"]] = {k: v for k, v in row.items() if k != "label"}
    for extra in (report.drift or []) + (report.compare or []):
        keep = {k: v for k, v in extra.items() if k in _RESULT_EXTRAS}
        out.setdefault(extra["label"], {}).update(keep)
    return json_safe(out)
