"""Writing a dataset version's files: balanced zstd Parquet shards and the errors table.

Both writers hold a bounded amount of rows (about one shard; one part of errors) and name their
files ``part-NNNNN-<tag>`` / ``errors-NNNNN-<tag>`` where the tag is the job's, so two jobs that
raced for one version never overwrite each other's files. Where the files go is the caller's
``path_of`` (a function of ``cluster.store.layout``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medray.cluster.store.lake import Lake
from medray.workers.shards import ERROR_SCHEMA, now_utc

log = logging.getLogger(__name__)
ROW_GROUP_BYTES = 16 * 1024 * 1024  # readers stream a shard one row group at a time
SAMPLE_BYTES = 4 * 1024 * 1024      # enough pixels to learn the compression ratio
NO_STATS = ("pixels", "original")   # min/max of pixel blobs is useless and costs time
FIRST_ERRORS = 5                    # errors a failure message quotes

PathOf = Callable[[str], str]       # file name -> its path in the lake


def parquet_bytes(table: pa.Table) -> pa.Buffer:
    """One shard as zstd Parquet, row groups of about ROW_GROUP_BYTES."""
    rows = max(1, int(ROW_GROUP_BYTES * table.num_rows / max(1, table.nbytes)))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=rows,
                   use_dictionary=["split", "format"],
                   write_statistics=[n for n in table.column_names if n not in NO_STATS])
    return sink.getvalue()


def _row_sizes(table: pa.Table) -> np.ndarray:
    sizes = np.full(table.num_rows, 64, dtype=np.int64)
    for name in ("pixels", "original", "source_uri", "metadata"):
        if name in table.column_names:
            lengths = pc.fill_null(pc.binary_length(table.column(name)), 0)
            sizes += lengths.to_numpy().astype(np.int64)
    return sizes


class ShardWriter:
    """Writes rows into shards of about ``target_bytes`` each, balanced, holding at most about
    one shard of rows.

    Balance comes from the caller's estimate of the bytes still to come (``more_bytes``): the
    rows left are cut into ceil(left / target) equal shards, so there is no small last shard.
    Sizes are Parquet file sizes: the raw-to-file compression ratio is learned from a sample.
    """

    def __init__(self, lake: Lake, path_of: PathOf, tag: str, target_bytes: int) -> None:
        self.lake, self.path_of, self.tag = lake, path_of, tag
        self.target = max(1, int(target_bytes))
        self.ratio: float | None = None  # raw table bytes per Parquet byte
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0
        self.shards: list[dict[str, Any]] = []

    @property
    def raw_target(self) -> float:
        return self.target * (self.ratio or 1.0)

    def add(self, table: pa.Table, more_bytes: float = 0.0) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_bytes += table.nbytes
        if self.ratio is None and self.pending_bytes >= min(SAMPLE_BYTES, self.target):
            self._learn_ratio()
        self._drain(max(0.0, more_bytes))

    def close(self) -> list[dict[str, Any]]:
        if self.pending_bytes and self.ratio is None:
            self._learn_ratio()
        if self.shards and 0 < self.pending_bytes < 0.5 * self.shards[-1]["raw_bytes"]:
            # the estimate of what was to come was too high: merge the tail with the last shard
            last = self.shards.pop()
            table = self.lake.read_parquet(last["path"])
            self.pending.insert(0, table)
            self.pending_bytes += table.nbytes
        self._drain(0.0)
        return self.shards

    def paths(self) -> list[str]:
        return [s["path"] for s in self.shards]

    def _learn_ratio(self) -> None:
        table = pa.concat_tables(self.pending)
        self.ratio = max(1.0, table.nbytes / max(1, parquet_bytes(table).size))

    def _drain(self, more: float) -> None:
        while self.pending_bytes > 0:
            left = self.pending_bytes + more
            per = left / max(1, math.ceil(left / self.raw_target))
            if self.pending_bytes < per:
                return
            self._write(per)

    def _write(self, nbytes: float) -> None:
        table = pa.concat_tables(self.pending)
        sizes = np.cumsum(_row_sizes(table)).astype(np.float64)
        sizes *= table.nbytes / max(1.0, sizes[-1])
        rows = int(np.clip(np.searchsorted(sizes, nbytes * 1.0001, side="right"), 1,
                           table.num_rows))
        head, rest = table.slice(0, rows), table.slice(rows)
        data = parquet_bytes(head)
        rel = self.path_of(f"part-{len(self.shards):05d}-{self.tag}.parquet")
        self.lake.write_bytes(rel, data)
        self.shards.append({"path": rel, "rows": head.num_rows, "bytes": data.size,
                            "raw_bytes": head.nbytes,
                            "sha256": hashlib.sha256(memoryview(data)).hexdigest()})
        log.debug("wrote shard %s: %d rows, %d bytes", rel, head.num_rows, data.size)
        # learn from what zstd really did, so later shards land nearer the target
        raw = sum(s["raw_bytes"] for s in self.shards)
        self.ratio = max(1.0, raw / max(1, sum(s["bytes"] for s in self.shards)))
        self.pending = [rest] if rest.num_rows else []
        self.pending_bytes = rest.nbytes if rest.num_rows else 0


class ErrorSink:
    """The version's errors table, written in parts so memory stays bounded."""

    def __init__(self, lake: Lake, path_of: PathOf, tag: str, part_rows: int = 50_000) -> None:
        self.lake, self.path_of, self.tag, self.part_rows = lake, path_of, tag, part_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.count = 0
        self.by_type: Counter[str] = Counter()
        self.first: list[tuple[str, str]] = []
        self.files: list[str] = []

    def add(self, failed: pa.Table) -> None:
        """Take the decoder's error rows (``remote.OUT_SCHEMA`` with ``_error_type`` set)."""
        if failed.num_rows == 0:
            return
        ids = pc.if_else(pc.equal(failed.column("image_id"), ""), None,
                         failed.column("image_id"))
        table = pa.table({
            "source_uri": failed.column("source_uri"), "image_id": ids,
            "error_type": failed.column("_error_type"),
            "message": failed.column("_error_message"),
            "stage": pc.fill_null(failed.column("_stage"), "decode"),
            "at": pa.array([now_utc()] * failed.num_rows, ERROR_SCHEMA.field("at").type),
        }, schema=ERROR_SCHEMA)
        self.count += table.num_rows
        self.by_type.update(table.column("error_type").to_pylist())
        if len(self.first) < FIRST_ERRORS:
            for uri, kind in zip(table.column("source_uri").to_pylist(),
                                 table.column("error_type").to_pylist(), strict=True):
                self.first.append((uri, kind))
            del self.first[FIRST_ERRORS:]
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rel = self.path_of(f"errors-{len(self.files):05d}-{self.tag}.parquet")
        self.lake.write_parquet(rel, pa.concat_tables(self.pending))
        self.files.append(rel)
        self.pending, self.pending_rows = [], 0
