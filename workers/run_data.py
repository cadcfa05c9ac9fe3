"""A scoring run's predictions as the report needs them, in two passes that merge.

Each prediction file becomes a ``Part``: per-label ``StreamingLabelStats`` over every row (image
counts, mean scores, histograms), the count of rows at the operating threshold, and the slim
rows the exact metrics need (rows with ground truth; every row only when drift, a comparison
or heatmaps ask for them). ``combine`` merges the parts of a run into ``RunData`` in any order.
Also here: who each row belongs to for the bootstrap (its patient, else the image itself), and
which rows two runs share.

Pure numpy/pyarrow: the report job runs ``summarize`` in one Ray task per file; the unit tests
call it on in-memory tables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.workers import subgroups
from medray.workers.errors import InputError
from medray.workers.scorer import score_column
from medray.workers.streaming import StreamingLabelStats

# Resolution of the streamed histograms: the 20-bin plots are exact, and so is a rate at any
# 3-decimal threshold.
STATS_BINS = 1000


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


def prediction_columns(labels: Sequence[str]) -> list[str]:
    """The columns ``summarize`` needs from a prediction file (it reads no others)."""
    return ["image_id", "true_labels", *(score_column(label) for label in labels)]


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

    @property
    def images(self) -> int:
        return self.rows - self.dropped

    @property
    def with_truth(self) -> int:
        return self.stats[0].labelled if self.stats else 0

    def label_index(self, label: str) -> int:
        return self.labels.index(label)


def combine(parts: Sequence[Part], labels: Sequence[str], thresholds: Sequence[float]
            ) -> RunData:
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
    )


def operating_thresholds(labels: Sequence[str], given: Mapping[str, float | None] | None
                         ) -> tuple[list[float], list[str]]:
    """(threshold, source) per label: the model card's thresholds (as the run's commit marker
    carries them), else 0.5, the rule the scorer applied."""
    given = given or {}
    values, sources = [], []
    for label in labels:
        value = given.get(label)
        if value is not None:
            values.append(float(value))
            sources.append("model card")
        else:
            values.append(0.5)
            sources.append("default 0.5")
    return values, sources


def patient_groups(image_id: np.ndarray, keys: pa.Table | None) -> tuple[np.ndarray, int]:
    """Bootstrap unit per row: its patient when the dataset knows one, else the image itself.

    ``keys`` holds (image_id, patient_key). Returns (units, rows that found a patient key).
    Prefixes keep a patient key from ever colliding with an image id.
    """
    n = len(image_id)
    own = np.array(["image:" + str(i) for i in image_id], dtype=object)
    if keys is None or keys.num_rows == 0 or n == 0:
        return own, 0
    idx = pc.index_in(pa.array(image_id.tolist(), pa.string()),
                      value_set=keys.column("image_id")).fill_null(-1).to_numpy()
    vals = np.asarray(keys.column("patient_key").to_pylist(), dtype=object)
    hit = idx >= 0
    hit[hit] = np.array([v is not None for v in vals[idx[hit]]], dtype=bool)
    out = own.copy()
    out[hit] = np.array(["patient:" + str(v) for v in vals[idx[hit]]], dtype=object)
    return out, int(hit.sum())


def attribute_json(row: Mapping[str, Any]) -> str | None:
    """One shard row's patient attributes as a JSON object: the keys of its ``metadata`` JSON
    and its other attribute columns (nulls left out); None when it has none."""
    out: dict[str, Any] = {}
    meta = row.get("metadata")
    if meta:
        try:
            parsed = json.loads(meta)
        except (TypeError, ValueError):
            parsed = None
        if isinstance(parsed, dict):
            out.update(parsed)
    out.update({k: v for k, v in row.items() if k != "metadata" and v is not None})
    return json.dumps(out, sort_keys=True, default=str) if out else None


def attributes_for(image_id: np.ndarray, keys: pa.Table | None, wanted: Sequence[str] | None
                   ) -> dict[str, np.ndarray]:
    """Attribute name -> subgroup of each row (None where unknown), from the ``attributes``
    column of ``keys`` (see ``attribute_json``).

    ``wanted`` None picks the usual patient attributes the dataset has (age, sex, view
    position); a name it lacks is an ``InputError`` listing the ones it has.
    """
    n = len(image_id)
    if keys is None or "attributes" not in keys.column_names or n == 0:
        if wanted:
            raise InputError(f"--subgroups {', '.join(wanted)}: this run's dataset keeps no "
                             "patient attributes (stage it with those CSV columns or DICOM "
                             "attributes kept)")
        return {}
    idx = pc.index_in(pa.array(image_id.tolist(), pa.string()),
                      value_set=keys.column("image_id")).fill_null(-1).to_numpy()
    docs = [json.loads(d) if d else {} for d in keys.column("attributes").to_pylist()]
    rows = [docs[i] if i >= 0 else {} for i in idx]
    available = sorted({k for d in docs for k in d})
    chosen: dict[str, str] = {}
    for name in wanted if wanted else subgroups.USUAL:
        key = subgroups.find_key(name, available)
        if key is None and wanted:
            raise InputError(f"--subgroups: no attribute {name!r} in this run's dataset (it "
                             f"has: {', '.join(available) or 'none'})")
        if key is not None and key not in chosen.values():
            chosen[name if wanted else key] = key
    return {name: subgroups.bands(name, [r.get(key) for r in rows])
            for name, key in chosen.items()}


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


def pair_rows(cur: RunData, other: RunData) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``cur`` with ground truth also scored in ``other``, their rows in ``other``)."""
    if cur.image_id.size == 0 or other.image_id.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    idx = pc.index_in(pa.array(cur.image_id.tolist(), pa.string()),
                      value_set=pa.array(other.image_id.tolist(), pa.string()))
    idx_np = idx.fill_null(-1).to_numpy()
    mine = np.flatnonzero((idx_np >= 0) & cur.known)
    return mine, idx_np[mine]


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
