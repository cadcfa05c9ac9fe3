"""The report job: a committed run's predictions -> per-label metrics with patient-level CIs,
calibration, drift against a reference run, a paired comparison with another run, Grad-CAM
heatmaps -> Parquet tables and one self-contained HTML file under ``runs/<run>/report/``.

The data is passed over in two distributed steps:
1. one Ray task per prediction file reads only ``image_id``, ``true_labels`` and the score
   columns and returns a ``Part``: mergeable summaries (``StreamingLabelStats`` per label, counts at
   the operating threshold) plus the slim rows the exact metrics need (rows with ground truth; all
   rows only when drift, a comparison or heatmaps ask for them);
2. one Ray task per label computes the exact metrics and their bootstrap intervals.

Everything above the "Ray and the lake" line is pure (numpy/pyarrow): the unit tests call it on
in-memory tables and compare each number with scikit-learn.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.workers import metrics
from medray.workers.errors import InputError, NotFoundError
from medray.workers.jsonsafe import json_safe
from medray.workers.metrics import StreamingLabelStats
from medray.workers.scorer import score_column
from medray.workers.shards import now_utc

log = logging.getLogger(__name__)

COMMIT = "_COMMITTED.json"
STATS_BINS = 1000  # resolution of the streamed histograms (exact 20-bin plots, 3-decimal rates)
PLOT_BINS = 20
CAL_BINS = 10
MAX_CURVE_POINTS = 400  # per ROC/PR curve in the HTML; the tables keep the exact values
ALPHA = 0.05  # 95% intervals
_THRESHOLD_METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1")
# Column order of a label's exact metrics, the same whether or not there is ground truth.
_ROW_KEYS = ("with_truth", "positives", "negatives", "prevalence", "tp", "fp", "tn", "fn",
             "auroc", "auroc_lo", "auroc_hi", "auprc", "auprc_lo", "auprc_hi",
             *(f"{m}{suffix}" for m in _THRESHOLD_METRICS for suffix in ("", "_lo", "_hi")),
             "accuracy", "ece")
# Bootstrap resamples are evaluated this many (resample x patient) cells at a time.
_BOOT_CELLS = 2_000_000

MapFn = Callable[[Callable[..., Any], list[dict[str, Any]]], list[Any]]


# --------------------------------------------------------------------------- one file


@dataclass
class Part:
    """What one prediction file contributes; ``Part``s merge in any order."""

    index: int
    rows: int  # rows in the file
    dropped: int  # rows without a finite score for every label (never counted anywhere)
    stats: list[StreamingLabelStats]  # per label
    above: np.ndarray  # per label: rows with score >= the operating threshold
    image_id: np.ndarray  # kept rows from here on
    scores: np.ndarray  # (k, L) float32, as stored
    known: np.ndarray  # (k,) bool: ground truth present
    y: np.ndarray  # (k, L) bool: label present in true_labels


def truth_matrix(true_labels: pa.ChunkedArray | pa.Array, labels: Sequence[str]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(known, y): ``null`` true_labels means unknown, ``[]`` means known negative for all."""
    arr = true_labels.combine_chunks() if isinstance(true_labels, pa.ChunkedArray) else true_labels
    n = len(arr)
    known = np.asarray(pc.invert(pc.is_null(arr)).to_numpy(zero_copy_only=False), dtype=bool)
    y = np.zeros((n, len(labels)), dtype=bool)
    if n:
        parents = pc.list_parent_indices(arr).to_numpy()
        values = pc.list_flatten(arr)
        for j, label in enumerate(labels):
            hit = np.asarray(pc.equal(values, label).fill_null(False).to_numpy(
                zero_copy_only=False), dtype=bool)
            y[parents[hit], j] = True
    return known, y


def summarize(table: pa.Table, labels: Sequence[str], thresholds: Sequence[float],
              keep_all: bool, index: int = 0) -> Part:
    """One prediction file -> its ``Part``. ``keep_all`` keeps rows without ground truth too."""
    cols = [score_column(label) for label in labels]
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise InputError(f"prediction file {index} has no columns {missing}: the run's labels "
                         "and its files disagree; re-score the dataset")
    n = table.num_rows
    scores = np.empty((n, len(labels)), dtype=np.float32)
    for j, col in enumerate(cols):
        scores[:, j] = table.column(col).to_numpy(zero_copy_only=False)
    known, y = truth_matrix(table.column("true_labels"), labels)
    finite = np.isfinite(scores).all(axis=1)
    thr = np.asarray(thresholds, dtype=np.float64)
    # float32 scores against float64 thresholds, exactly as the scorer decided predicted_labels.
    above = (scores[finite] >= thr).sum(axis=0).astype(np.int64)
    stats = []
    for j in range(len(labels)):
        st = StreamingLabelStats(STATS_BINS)
        st.update(y[finite & known, j], scores[finite & known, j])
        st.update(None, scores[finite & ~known, j])
        stats.append(st)
    keep = finite & (known | keep_all)
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    return Part(index=index, rows=n, dropped=int((~finite).sum()), stats=stats, above=above,
                image_id=ids[keep], scores=scores[keep], known=known[keep], y=y[keep])


# --------------------------------------------------------------------------- one run


@dataclass
class RunData:
    """A run's merged summaries and its slim rows (in file order)."""

    labels: list[str]
    thresholds: list[float]
    rows: int
    dropped: int
    stats: list[StreamingLabelStats]
    above: np.ndarray
    image_id: np.ndarray
    scores: np.ndarray
    known: np.ndarray
    y: np.ndarray
    file_index: np.ndarray  # (k,) which prediction file each kept row came from
    has_all_rows: bool = False

    @property
    def images(self) -> int:
        return self.rows - self.dropped

    @property
    def with_truth(self) -> int:
        return self.stats[0].labelled if self.stats else 0

    def label_index(self, label: str) -> int:
        return self.labels.index(label)


def combine(parts: Sequence[Part], labels: Sequence[str], thresholds: Sequence[float],
            keep_all: bool) -> RunData:
    """Merge file parts: summaries add up, slim rows concatenate in file order."""
    parts = sorted(parts, key=lambda p: p.index)
    n_labels = len(labels)
    stats = [StreamingLabelStats(STATS_BINS) for _ in labels]
    above = np.zeros(n_labels, dtype=np.int64)
    for p in parts:
        stats = [a.merge(b) for a, b in zip(stats, p.stats, strict=True)]
        above += p.above

    def cat(name: str, empty: np.ndarray) -> np.ndarray:
        arrays = [getattr(p, name) for p in parts]
        return np.concatenate(arrays) if arrays else empty

    return RunData(
        labels=list(labels), thresholds=[float(t) for t in thresholds],
        rows=sum(p.rows for p in parts), dropped=sum(p.dropped for p in parts), stats=stats,
        above=above, image_id=cat("image_id", np.empty(0, dtype=object)),
        scores=cat("scores", np.empty((0, n_labels), dtype=np.float32)),
        known=cat("known", np.empty(0, dtype=bool)),
        y=cat("y", np.empty((0, n_labels), dtype=bool)),
        file_index=np.concatenate([np.full(len(p.image_id), p.index, dtype=np.int32)
                                   for p in parts]) if parts else np.empty(0, dtype=np.int32),
        has_all_rows=keep_all,
    )


def run_thresholds(marker: dict[str, Any]) -> tuple[list[float], list[str]]:
    """The operating threshold per label from the run marker (the model card's), else 0.5."""
    given = marker.get("thresholds") or {}
    values, sources = [], []
    for label in marker["labels"]:
        if label in given and given[label] is not None:
            values.append(float(given[label]))
            sources.append("model card")
        else:
            values.append(0.5)
            sources.append("default 0.5")
    return values, sources


def patient_groups(image_id: np.ndarray, keys: pa.Table | None) -> tuple[np.ndarray, int]:
    """Bootstrap unit per row: its patient when the dataset knows one, else the image itself.

    Returns (units, rows that found a patient key). Prefixes keep a patient key from ever
    colliding with an image id.
    """
    n = len(image_id)
    own = np.array(["image:" + str(i) for i in image_id], dtype=object)
    if keys is None or keys.num_rows == 0 or n == 0:
        return own, 0
    idx = pc.index_in(pa.array(image_id.tolist(), pa.string()),
                      value_set=keys.column("image_id")).fill_null(-1).to_numpy()
    vals = np.asarray(keys.column("patient_key").to_pylist(), dtype=object)
    hit = idx >= 0
    out = own.copy()
    out[hit] = np.array(["patient:" + str(v) for v in vals[idx[hit]]], dtype=object)
    return out, int(hit.sum())


def ci_note(groups: np.ndarray, dataset: str) -> tuple[str, str, int]:
    """(unit, sentence, units) for the summary: what the bootstrap resamples, given the
    bootstrap units of the rows with ground truth (from ``patient_groups``)."""
    n_rows = len(groups)
    if n_rows == 0:
        return "none", "no ground truth: no confidence intervals", 0
    n_keyed = sum(1 for g in groups if str(g).startswith("patient:"))
    n_units = len(set(groups.tolist()))
    if n_keyed == n_rows:
        return "patient", (f"95% CIs resample patients ({n_units} patients, {n_rows} images), "
                           "so correlated images of one patient are not counted as "
                           "independent"), n_units
    if n_keyed == 0:
        return "image", (f"dataset {dataset} has no patient key: 95% CIs resample images "
                         f"({n_rows}), which understates uncertainty when a patient has several "
                         "images"), n_units
    return "patient+image", (f"95% CIs resample patients; {n_rows - n_keyed} of {n_rows} images "
                             f"have no patient key in {dataset} and count as their own patient "
                             f"({n_units} units)"), n_units


# --------------------------------------------------------------------------- exact metrics


def _units(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    if groups is None:
        return np.arange(n), n
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    inverse = inverse.reshape(-1)
    return inverse, int(inverse.max()) + 1 if n else 0


def threshold_ci(y: np.ndarray, s: np.ndarray, threshold: float, groups: np.ndarray | None,
                 n_boot: int, alpha: float = ALPHA, seed: int = 0
                 ) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of sensitivity, specificity, PPV, NPV and F1 at a fixed
    threshold, resampling ``groups`` (patients) when given.

    Confusion counts are additive over patients, so each resample is a matrix product of the
    draw counts with per-patient counts: 1000 resamples of 100k patients (200k images) take
    2.5 s of CPU, where calling ``threshold_metrics`` per resample would take minutes.
    Resamples where a rate is undefined (no positives drawn) are skipped, as in
    ``metrics.bootstrap_ci``.
    """
    y = np.asarray(y, dtype=bool)
    pred = np.asarray(s, dtype=np.float64) >= threshold
    n = y.shape[0]
    nan = (math.nan, math.nan)
    if n == 0 or n_boot < 1:
        return dict.fromkeys(_THRESHOLD_METRICS, nan)
    unit, n_units = _units(groups, n)
    per_unit = np.stack([np.bincount(unit, weights=(pred & y).astype(np.float64),
                                     minlength=n_units),
                         np.bincount(unit, weights=(pred & ~y).astype(np.float64),
                                     minlength=n_units),
                         np.bincount(unit, weights=(~pred & y).astype(np.float64),
                                     minlength=n_units),
                         np.bincount(unit, weights=(~pred & ~y).astype(np.float64),
                                     minlength=n_units)], axis=1)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELLS // n_units)
    totals = np.empty((n_boot, 4))
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        draws = rng.integers(0, n_units, size=(m, n_units))
        flat = (draws + (np.arange(m) * n_units)[:, None]).ravel()
        counts = np.bincount(flat, minlength=m * n_units).reshape(m, n_units)
        totals[start:start + m] = counts.astype(np.float64) @ per_unit
    tp, fp, fn, tn = totals.T
    with np.errstate(invalid="ignore", divide="ignore"):
        values = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                  "ppv": tp / (tp + fp), "npv": tn / (tn + fn),
                  "f1": 2 * tp / (2 * tp + fp + fn)}
    out: dict[str, tuple[float, float]] = {}
    for name, v in values.items():
        v = v[np.isfinite(v)]
        if v.size == 0:
            out[name] = nan
        else:
            lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2])
            out[name] = (float(lo), float(hi))
    return out


def _thin(x: np.ndarray, y: np.ndarray, limit: int = MAX_CURVE_POINTS) -> dict[str, list]:
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
            _, lo, hi = metrics.bootstrap_ci(fn, y, s, groups=groups, n_boot=n_boot,
                                             alpha=ALPHA, seed=seed)
        else:
            lo = hi = nan
        row[f"{name}_lo"], row[f"{name}_hi"] = lo, hi
    cis = threshold_ci(y, s, threshold, groups, n_boot if boot else 0, ALPHA, seed)
    for name in _THRESHOLD_METRICS:
        row[f"{name}_lo"], row[f"{name}_hi"] = cis[name]
    cal = metrics.calibration(y, s, CAL_BINS)
    row["ece"] = cal["ece"]
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


# --------------------------------------------------------------------------- drift, compare


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
            row.update(metrics.drift_flags(b, a, psi_threshold=psi_threshold))
        else:
            row.update({"psi": math.nan, "ks": math.nan, "ks_pvalue": math.nan, "drifted": None})
        rows.append(row)
    return rows


def pair_rows(cur: RunData, other: RunData) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``cur`` with ground truth also scored in ``other``, their rows in ``other``)."""
    if cur.image_id.size == 0 or other.image_id.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    idx = pc.index_in(pa.array(cur.image_id.tolist(), pa.string()),
                      value_set=pa.array(other.image_id.tolist(), pa.string()))
    idx_np = idx.fill_null(-1).to_numpy()
    mine = np.flatnonzero((idx_np >= 0) & cur.known)
    return mine, idx_np[mine]


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
        if 0 < y.sum() < y.size:
            if n_boot > 0:
                d = metrics.paired_bootstrap_diff(metrics.auroc, y, a, b, groups=g,
                                                  n_boot=n_boot, alpha=ALPHA, seed=seed)
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


def top_images(run: RunData, k: int) -> list[tuple[int, int, int]]:
    """(label index, rank, row) of the ``k`` highest-scored images per label.

    Ties go to the smaller image id, so a rerun picks the same images.
    """
    out: list[tuple[int, int, int]] = []
    if k < 1 or run.image_id.size == 0:
        return out
    ids = run.image_id.astype(str)
    for j in range(len(run.labels)):
        order = np.lexsort((ids, -run.scores[:, j].astype(np.float64)))[:k]
        out.extend((j, rank, int(row)) for rank, row in enumerate(order, start=1))
    return out


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    per_label: list[dict[str, Any]]
    thresholds: list[dict[str, Any]]
    calibration: list[dict[str, Any]]
    drift: list[dict[str, Any]] | None
    compare: list[dict[str, Any]] | None
    plots: dict[str, dict[str, Any]] = field(default_factory=dict)


def _serial_map(fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
    return [fn(**kw) for kw in calls]


def build_report(cur: RunData, groups: np.ndarray | None, n_boot: int,
                 threshold_sources: Sequence[str] | None = None,
                 reference: RunData | None = None, compare: RunData | None = None,
                 drift_psi: float = 0.2, map_fn: MapFn = _serial_map) -> Report:
    """All tables of a report from merged run data. ``map_fn`` runs ``label_metrics`` calls
    (serially here, as Ray tasks in the job); ``groups`` gives each kept row its bootstrap unit.
    """
    known = np.flatnonzero(cur.known)
    if groups is not None:
        # Integer codes: cheaper to ship to the label tasks and to factorise again in each
        # bootstrap than patient-key strings; the grouping is the same.
        groups = np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    g_known = groups[known] if groups is not None else None
    calls = [{"y": cur.y[known, j], "s": cur.scores[known, j], "threshold": cur.thresholds[j],
              "groups": g_known, "n_boot": n_boot} for j in range(len(cur.labels))]
    results = map_fn(label_metrics, calls)
    sources = list(threshold_sources or ["given"] * len(cur.labels))
    per_label, thresholds, calibration, plots = [], [], [], {}
    for j, label in enumerate(cur.labels):
        exact, label_plots = results[j]
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
                  drift=drift, compare=cmp, plots=plots)


def result_metrics(report: Report) -> dict[str, dict[str, Any]]:
    """The job result's ``metrics``: per label, the table row plus drift and comparison."""
    out: dict[str, dict[str, Any]] = {}
    for row in report.per_label:
        out[row["label"]] = {k: v for k, v in row.items() if k != "label"}
    for extra in (report.drift or []) + (report.compare or []):
        keep = {k: v for k, v in extra.items() if k in ("psi", "ks", "ks_pvalue", "drifted",
                                                        "compare_auroc", "auroc_diff",
                                                        "auroc_diff_lo", "auroc_diff_hi",
                                                        "auroc_diff_p")}
        out.setdefault(extra["label"], {}).update(keep)
    return json_safe(out)


_INT_COLUMNS = {"images", "with_truth", "positives", "negatives", "tp", "fp", "tn", "fn",
                "paired_images", "reference_images", "bin", "count", "rank", "model_version",
                "dataset_version", "errors", "dropped", "n_boot", "patients", "heatmaps",
                "score_jobs"}
_STR_COLUMNS = {"label", "source", "run_id", "model", "dataset", "split", "ci_unit", "ci_note",
                "reference", "compare", "created_at", "report_uri", "html_uri", "image_id",
                "uri", "layer", "currency"}
_LIST_COLUMNS = {"labels", "drifted_labels"}


def _column_type(name: str) -> pa.DataType:
    if name in _INT_COLUMNS:
        return pa.int64()
    if name in _STR_COLUMNS:
        return pa.string()
    if name in _LIST_COLUMNS:
        return pa.list_(pa.string())
    if name == "drifted":
        return pa.bool_()
    return pa.float64()


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> a table whose column types do not depend on the data (an all-null AUROC column
    of a run without ground truth is still float64), so reports stack across runs."""
    rows = json_safe(rows)
    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    schema = pa.schema([pa.field(n, _column_type(n)) for n in names])
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows], schema=schema)


def safe_name(label: str) -> str:
    """A label as a lake path segment."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label) or "_"


# =========================================================================== Ray and the lake


def _read_part(lake_uri: str, rel: str, index: int, labels: list[str], thresholds: list[float],
               keep_all: bool) -> Part:
    from medray.cluster.store.lake import Lake

    columns = ["image_id", "true_labels", *[score_column(label) for label in labels]]
    table = Lake(lake_uri).read_parquet(rel, columns=columns)
    return summarize(table, labels, thresholds, keep_all, index)


def _read_keys(lake_uri: str, rel: str, split: str | None) -> pa.Table:
    from medray.cluster.store.lake import Lake

    cols = ["image_id", "patient_key", *(["split"] if split else [])]
    table = Lake(lake_uri).read_parquet(rel, columns=cols)
    if split:
        table = table.filter(pc.equal(table.column("split"), split)).drop_columns(["split"])
    return table.filter(pc.is_valid(table.column("patient_key")))


def _remote(fn: Callable[..., Any], **options: Any) -> Any:
    import ray

    from medray.workers.errors import InfraError

    # Storage hiccups are worth a retry; bad input is not.
    # (Ray's stubs type retry_exceptions as bool; a list of exception classes is documented.)
    decorator: Any = ray.remote(max_retries=3, retry_exceptions=[InfraError],  # type: ignore[call-overload]
                                **options)
    return decorator(fn)


def _gather(refs: list[Any]) -> list[Any]:
    """Results in completion order, so the driver merges while other tasks still run."""
    import ray

    out, pending = [], list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        out.extend(ray.get(done))
    return out


def load_run(lake: Any, run_id: str, marker: dict[str, Any], keep_all: bool, job_id: str
             ) -> RunData:
    """A committed run's ``RunData``: one Ray task per prediction file."""
    thresholds, _ = run_thresholds(marker)
    labels = list(marker["labels"])
    task = _remote(_read_part, num_cpus=0.25)
    refs = [task.remote(lake.uri, f"runs/{run_id}/{f}", i, labels, thresholds, keep_all)
            for i, f in enumerate(marker["files"])]
    parts = _gather(refs)
    data = combine(parts, labels, thresholds, keep_all)
    if data.dropped:
        log.warning("[%s] run %s: %d rows without a finite score were left out", job_id, run_id,
                    data.dropped)
    log.info("[%s] run %s: %d files, %d images, %d with ground truth", job_id, run_id,
             len(parts), data.images, data.with_truth)
    return data


def _shard_paths(lake: Any, marker: dict[str, Any]) -> dict[str, str] | None:
    """Prediction-file stem -> dataset shard path, or None when the dataset is gone."""
    from medray.cluster.store import catalog, layout

    try:
        manifest = catalog.manifest(lake, marker["dataset"], int(marker["dataset_version"]))
    except NotFoundError:
        return None
    return {layout.shard_stem(s["path"]): s["path"] for s in manifest["shards"]}


def _stem(rel: str) -> str:
    return rel.rsplit("/", 1)[-1].removesuffix(".parquet")


def load_patient_keys(lake: Any, marker: dict[str, Any], job_id: str) -> pa.Table | None:
    """(image_id, patient_key) of the run's dataset shards, read in parallel; None if gone."""
    shards = _shard_paths(lake, marker)
    if shards is None:
        log.warning("[%s] dataset %s:%s is gone: CIs resample images", job_id,
                    marker["dataset"], marker["dataset_version"])
        return None
    wanted = [shards[_stem(f)] for f in marker["files"] if _stem(f) in shards]
    task = _remote(_read_keys, num_cpus=0.25)
    tables = _gather([task.remote(lake.uri, p, marker.get("split")) for p in wanted])
    return pa.concat_tables(tables) if tables else None


def _ray_map(fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
    """One Ray task per label; arrays shared by every call (the groups) go to the store once."""
    import ray

    task = _remote(fn, num_cpus=1)
    shared: dict[int, Any] = {}
    refs = []
    for kw in calls:
        args = dict(kw)
        g = args.get("groups")
        if g is not None:
            if id(g) not in shared:
                shared[id(g)] = ray.put(g)
            args["groups"] = shared[id(g)]
        refs.append(task.remote(**args))
    return ray.get(refs)


def _heatmap_task(lake_uri: str, card: dict[str, Any], requests: dict[str, list[str]],
                  picks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Grad-CAM overlays for the picked images, with the run's model loaded once."""
    from medray.cluster.store import registry
    from medray.cluster.store.lake import Lake
    from medray.workers.gradcam import GradCam, overlay_pngs
    from medray.workers.models import ModelCard, configure_tensorflow, load_model
    from medray.workers.shards import decode_pixels

    lake = Lake(lake_uri)
    configure_tensorflow()
    # A private cache: the shared one is keyed by model name and version only, so another
    # lake's model of the same name could be picked up.
    cache = tempfile.mkdtemp(prefix="medray-gradcam-")
    try:
        model = load_model(registry.fetch(lake, ModelCard.from_dict(card), cache_dir=cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    cam = GradCam(model)
    pixels: dict[str, np.ndarray] = {}
    for rel, ids in requests.items():
        table = lake.read_parquet(rel, columns=["image_id", "height", "width", "channels",
                                                "pixels"])
        table = table.filter(pc.is_in(table.column("image_id"), pa.array(ids, pa.string())))
        for r in table.to_pylist():
            pixels[r["image_id"]] = decode_pixels(r["pixels"], r["height"], r["width"],
                                                  r["channels"])
    missing = sorted({p["image_id"] for p in picks} - set(pixels))
    if missing:
        raise NotFoundError(f"{len(missing)} scored images are not in their dataset shards "
                            f"(e.g. {missing[0]}): was the dataset version rewritten?")
    out = []
    for p in picks:
        (png,) = overlay_pngs(cam, pixels[p["image_id"]][None], p["label_index"])
        out.append({**p, "png": png, "layer": cam.layer_name})
    return out


def start_heatmaps(lake: Any, marker: dict[str, Any], cur: RunData, k: int) -> Any | None:
    """Submit the Grad-CAM task for the top-``k`` images per label; returns its ObjectRef.

    Started before the metrics so that its TensorFlow import and model load overlap them.
    """
    from medray.cluster.store import registry

    picks = top_images(cur, k)
    if not picks:
        return None
    shards = _shard_paths(lake, marker)
    if shards is None:
        raise NotFoundError(f"dataset {marker['dataset']}:{marker['dataset_version']} is gone, "
                            "so there are no pixels for heatmaps; run without --heatmaps")
    card = registry.resolve(lake, f"{marker['model']}:{marker['model_version']}")
    requests: dict[str, list[str]] = {}
    payload = []
    for j, rank, row in picks:
        image = str(cur.image_id[row])
        shard = shards[_stem(marker["files"][int(cur.file_index[row])])]
        wanted = requests.setdefault(shard, [])
        if image not in wanted:
            wanted.append(image)
        payload.append({"label": cur.labels[j], "label_index": j, "rank": rank,
                        "image_id": image, "score": float(cur.scores[row, j])})
    task = _remote(_heatmap_task, num_cpus=1)
    return task.remote(lake.uri, card.__dict__, requests, payload)


def finish_heatmaps(lake: Any, ref: Any | None, base: str, job_id: str) -> list[dict[str, Any]]:
    """Wait for the Grad-CAM task and write its PNGs under ``<base>/heatmaps/<label>/``."""
    import ray

    if ref is None:
        return []
    results = ray.get(ref)
    for r in results:
        rel = f"{base}/heatmaps/{safe_name(r['label'])}/{r['rank']:02d}-{r['image_id'][:16]}.png"
        lake.write_bytes(rel, r["png"])
        r["uri"] = lake.full_uri(rel)
    log.info("[%s] wrote %d Grad-CAM overlays (layer %s)", job_id, len(results),
             results[0]["layer"] if results else "-")
    return results


def _run_dict(spec: dict[str, Any], lake: Any, job_id: str) -> dict[str, Any]:
    from medray.cluster.store import runs
    from medray.workers import report_html

    started = time.monotonic()
    timings: dict[str, float] = {}  # seconds per phase, kept in the commit marker
    clock = [started]

    def lap(name: str) -> None:
        now = time.monotonic()
        timings[name] = round(now - clock[0], 2)
        clock[0] = now

    run_id = spec["run_id"]
    # The entrypoint passes the spec as given, so ReportSpec's defaults are repeated here.
    n_boot = int(1000 if spec.get("n_boot") is None else spec["n_boot"])
    k = int(spec.get("heatmaps") or 0)
    psi_threshold = float(spec.get("drift_psi") or 0.2)
    marker = runs.read_commit(lake, run_id)
    # Fail on a wrong --reference/--compare before any work.
    ref_marker = runs.read_commit(lake, spec["reference"]) if spec.get("reference") else None
    cmp_marker = runs.read_commit(lake, spec["compare"]) if spec.get("compare") else None
    base = f"runs/{run_id}/report"
    lake.delete(f"{base}/{COMMIT}")  # a report being rewritten is not a committed report
    lake.delete_dir(f"{base}/heatmaps")
    keep_all = bool(ref_marker or cmp_marker or k)
    cur = load_run(lake, run_id, marker, keep_all, job_id)
    ref = load_run(lake, spec["reference"], ref_marker, True, job_id) if ref_marker else None
    if cmp_marker is None:
        other = None
    elif ref is not None and spec["compare"] == spec["reference"]:
        other = ref  # one read serves both
    else:
        other = load_run(lake, spec["compare"], cmp_marker, True, job_id)
    if other is not None and pair_rows(cur, other)[0].size == 0 and cur.with_truth:
        raise InputError(f"runs {run_id} and {spec['compare']} share no scored images with "
                         "ground truth: --compare needs a run of another model on the same "
                         "dataset")
    lap("read_predictions")
    heat_ref = start_heatmaps(lake, marker, cur, k) if k else None
    dataset = f"{marker['dataset']}:{marker['dataset_version']}"
    keys = load_patient_keys(lake, marker, job_id) if cur.with_truth else None
    groups, _ = patient_groups(cur.image_id, keys)
    unit, note, n_units = ci_note(groups[cur.known], dataset)
    lap("patient_keys")
    _, sources = run_thresholds(marker)
    report = build_report(cur, groups, n_boot, sources, ref, other, psi_threshold, _ray_map)
    lap("metrics")
    heat = finish_heatmaps(lake, heat_ref, base, job_id)
    lap("heatmaps")
    drifted = [r["label"] for r in report.drift or [] if r.get("drifted")]
    summary = {
        "run_id": run_id, "model": marker["model"], "model_version": marker["model_version"],
        "dataset": marker["dataset"], "dataset_version": marker["dataset_version"],
        "split": marker.get("split"), "images": cur.images, "errors": marker.get("errors", 0),
        "dropped": cur.dropped, "with_truth": cur.with_truth, "labels": cur.labels,
        "n_boot": n_boot, "ci_unit": unit, "ci_note": note, "patients": n_units,
        "reference": spec.get("reference"), "compare": spec.get("compare"),
        "drift_psi": psi_threshold if ref is not None else None, "drifted_labels": drifted,
        "heatmaps": len(heat), "created_at": now_utc().isoformat(),
        **runs.run_cost(lake, run_id, marker.get("images")),
        "report_uri": lake.full_uri(base), "html_uri": lake.full_uri(f"{base}/report.html"),
    }
    html = report_html.render(report_html.document(summary, report.per_label, report.plots,
                                                   report.drift, report.compare, heat))
    lake.write_parquet(f"{base}/per_label_metrics.parquet", _table(report.per_label))
    lake.write_parquet(f"{base}/thresholds.parquet", _table(report.thresholds))
    if report.calibration:
        lake.write_parquet(f"{base}/calibration.parquet", _table(report.calibration))
    if report.drift is not None:
        lake.write_parquet(f"{base}/drift.parquet", _table(report.drift))
    if report.compare is not None:
        lake.write_parquet(f"{base}/compare.parquet", _table(report.compare))
    if heat:
        lake.write_parquet(f"{base}/heatmaps.parquet", _table(
            [{k2: v for k2, v in h.items() if k2 not in ("png", "label_index")} for h in heat]))
    lake.write_bytes(f"{base}/report.html", html.encode())
    lake.write_parquet(f"{base}/summary.parquet", _table([summary]))
    lap("write")
    seconds = round(time.monotonic() - started, 2)
    lake.write_json(f"{base}/{COMMIT}", json_safe({**summary, "job_id": job_id, "seconds": seconds,
                                                "timings": timings}))  # the commit point
    log.info("[%s] report for %s: %d images, %d with truth, %s CIs, %d drifted, %.1fs %s",
             job_id, run_id, cur.images, cur.with_truth, unit, len(drifted), seconds, timings)
    return json_safe({"run_id": run_id, "metrics": result_metrics(report),
                  "report_uri": summary["report_uri"], "html_uri": summary["html_uri"],
                  "summary": summary})


def run(spec: Any, lake: Any, ctx: Any) -> dict[str, Any]:  # transitional: typed spec below
    return _run_dict(spec.model_dump(), lake, ctx.job_id)
