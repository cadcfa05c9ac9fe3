"""What training reads: labelled rows of one split, from image shards or cached features.

The readers are generators (shard paths in, numpy batches out). For the train split they run
as Ray Data UDFs: ``dataset`` builds the pipeline the driver hands to Ray Train, which splits
it across workers as a stream (no full copy per worker). The validation split, which rank 0
scores whole every epoch, is read by rank 0 itself, in a thread (``SplitRows``), from its
start. ``count_rows`` reads two columns per shard on the driver, before anything starts, so
batch sizes and class weights are known.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.store.lake import Lake
from medray.workers.shards import labels_to_targets

COLUMNS = ["pixels", "labels", "split", "height", "width", "channels"]
READER_CPUS = 0.25  # shard readers are I/O bound; they must fit beside the training workers
MAX_READERS = 4

Batch = dict[str, np.ndarray]
Reader = Callable[..., Iterator[Batch]]


@dataclass(frozen=True)
class RowCounts:
    """Labelled images per split and positives per label: in the train split (``positives``)
    and in every split (``by_split``, for the model card)."""

    splits: dict[str, int]
    positives: dict[str, int]
    by_split: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def train(self) -> int:
        return self.splits.get("train", 0)

    @property
    def val_split(self) -> str:
        """The split that validates and chooses thresholds: val, else test (with a warning)."""
        return "val" if self.splits.get("val") else "test"


def count_rows(lake: Lake, manifest: dict[str, Any], labels: list[str]) -> RowCounts:
    """Count labelled rows per split and positives per label in train (reads two columns)."""
    per_split: dict[str, int] = {}
    by_split: dict[str, dict[str, int]] = {}
    for shard in manifest["shards"]:
        table = lake.read_parquet(shard["path"], columns=["split", "labels"])
        table = table.filter(pc.is_valid(table.column("labels")))
        for split, names in zip(table.column("split").to_pylist(),
                                table.column("labels").to_pylist(), strict=True):
            per_split[split] = per_split.get(split, 0) + 1
            counts = by_split.setdefault(split, dict.fromkeys(labels, 0))
            for name in names or ():
                if name in counts:
                    counts[name] += 1
    return RowCounts(per_split, dict(by_split.get("train", dict.fromkeys(labels, 0))),
                     by_split)


def labelled(table: pa.Table, split: str) -> pa.Table:
    """Rows of one split whose ground truth is known, in a fresh random order.

    Shards keep staging order (a folder source is sorted by class), so rows are permuted here;
    the permutation is not seeded: see docs/training.md on nondeterminism.
    """
    table = table.filter(pc.and_(pc.equal(table.column("split"), split),
                                 pc.is_valid(table.column("labels"))))
    order = np.random.default_rng().permutation(table.num_rows)
    return table.take(pa.array(order, pa.int64())) if table.num_rows else table


def pixels(part: pa.Table) -> np.ndarray:
    """uint8 (n, H, W, C) from the rows of one shard (every row of a shard has one size)."""
    h, w, c = (part.column(k)[0].as_py() for k in ("height", "width", "channels"))
    blob = b"".join(part.column("pixels").to_pylist())
    return np.frombuffer(blob, np.uint8).reshape(part.num_rows, h, w, c)


def units(part: pa.Table) -> np.ndarray:
    """Bootstrap unit per row: its patient key where staging knew one, else its image id."""
    ids = part.column("image_id").to_pylist()
    keys = part.column("patient_key").to_pylist() if "patient_key" in part.column_names \
        else [None] * len(ids)
    return np.array([f"patient:{k}" if k else f"image:{i}" for k, i in zip(keys, ids,
                                                                         strict=True)],
                    dtype=object)


def read_images(batch: dict[str, Any], lake_uri: str, split: str, labels: list[str],
                multi_label: bool, rows: int = 256, keys: bool = False) -> Iterator[Batch]:
    """Ray Data UDF: shard paths -> {"x": uint8 (n,H,W,C), "y": float32 (n,L)} of one split;
    ``keys`` adds "g", each row's patient (for validation intervals)."""
    lake = Lake(lake_uri)
    columns = COLUMNS + (["image_id", "patient_key"] if keys else [])
    for path in batch["path"]:
        table = labelled(lake.read_parquet(str(path), columns=columns), split)
        for start in range(0, table.num_rows, rows):
            part = table.slice(start, rows)
            y = labels_to_targets(part.column("labels").to_pylist(), labels, multi_label)
            yield {"x": pixels(part), "y": y, **({"g": units(part)} if keys else {})}


def read_features(batch: dict[str, Any], lake_uri: str, split: str, labels: list[str],
                  multi_label: bool, rows: int = 1024, keys: bool = False) -> Iterator[Batch]:
    """Ray Data UDF: cached feature files -> {"x": float32 (n,D), "y": float32 (n,L)};
    ``keys`` adds "g" (image ids: feature files carry no patient key)."""
    lake = Lake(lake_uri)
    for path in batch["path"]:
        table = labelled(lake.read_parquet(str(path)), split)
        for start in range(0, table.num_rows, rows):
            part = table.slice(start, rows)
            col = part.column("features").combine_chunks()
            x = col.flatten().to_numpy(zero_copy_only=False).reshape(part.num_rows, -1)
            y = labels_to_targets(part.column("labels").to_pylist(), labels, multi_label)
            yield {"x": x.astype(np.float32, copy=False), "y": y,
                   **({"g": units(part)} if keys else {})}


def dataset(paths: list[str], reader: Reader, lake: Lake, split: str, labels: list[str],
            multi_label: bool, keys: bool = False) -> Any:
    """A Ray Data pipeline of one split: one block per file, a few light reader tasks."""
    import ray

    return ray.data.from_items([{"path": p} for p in paths],
                               override_num_blocks=len(paths)).map_batches(
        reader, fn_kwargs={"lake_uri": lake.uri, "split": split, "labels": labels,
                           "multi_label": multi_label, "keys": keys},
        batch_size=1, batch_format="numpy", num_cpus=READER_CPUS,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(MAX_READERS, len(paths)))))


def reader_for(cached: bool) -> Reader:
    """The reader of a training's files: cached features for a cached head, else images."""
    return read_features if cached else read_images


class SplitRows:
    """The rows of one split with each row's bootstrap unit ("g"), in the reader's batches,
    file by file, read by a thread of the process that scores them (the training's rank 0)
    from the moment it starts, so the reading runs beside the worker's TensorFlow import and
    first epoch.

    Ray Data's ``materialize()`` on the driver held a small job 1.1 s before Ray Train could
    start, and Ray tasks in its place each started a Python process on the same cores as the
    workers (BENCHMARKS.md "Start-up"). ``batches()`` waits for the thread and raises what the
    reading raised."""

    def __init__(self, paths: list[str], reader: Reader, lake_uri: str, split: str,
                 labels: list[str], multi_label: bool) -> None:
        self._batches: list[Batch] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._read, args=(paths, reader, lake_uri, split, labels, multi_label),
            name=f"medray-{split}-rows", daemon=True)
        self._thread.start()

    def _read(self, paths: list[str], reader: Reader, lake_uri: str, split: str,
              labels: list[str], multi_label: bool) -> None:
        try:
            self._batches.extend(reader({"path": paths}, lake_uri, split, labels, multi_label,
                                      keys=True))
        except BaseException as exc:  # noqa: BLE001 - raised again by batches(), in the caller
            self._error = exc

    def batches(self) -> list[Batch]:
        """Every batch of the split's rows (a file with none gives none), once all are read."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._batches
