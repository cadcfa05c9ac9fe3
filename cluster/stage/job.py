"""The stage job: list a source, decode it in a Ray Data actor pool (streaming), and write a new
dataset version: balanced zstd Parquet shards, the errors table, and the manifest last.

The driver holds at most about one shard of pixels (``ShardWriter``), the set of image ids seen
(for de-duplication) and one small record per image of the previous version (for reuse); never
the whole collection. A failed job deletes what it wrote; its manifest never exists, so nothing
of it is visible to any reader.

Re-staging the same source with the same content options makes a new version that lists the
previous version's unchanged shards as they are (same paths), decodes only images it has not
seen, and rewrites only shards that lost images, changed labels, or are small.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medray.cluster.stage import sources
from medray.cluster.store import catalog
from medray.cluster.store.lake import Lake
from medray.workers.errors import InfraError, InputError
from medray.workers.shards import (
    ERROR_SCHEMA,
    SHARD_SCHEMA,
    now_utc,
    parse_max_errors,
)

log = logging.getLogger(__name__)
ROW_GROUP_BYTES = 16 * 1024 * 1024  # readers stream a shard one row group at a time
SAMPLE_BYTES = 4 * 1024 * 1024      # enough pixels to learn the compression ratio
PROGRESS_SECONDS = 5.0
NO_STATS = ("pixels", "original")   # min/max of pixel blobs is useless and costs time
PIXEL_LAYOUT = "uint8, row-major height x width x channels (HWC), one blob per image"


# ---------------------------------------------------------------------------- shards
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

    def __init__(self, lake: Lake, prefix: str, tag: str, target_bytes: int) -> None:
        self.lake, self.prefix, self.tag = lake, prefix, tag
        self.target = max(1, int(target_bytes))
        self.ratio: float | None = None  # raw table bytes per Parquet byte
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0
        self.shards: list[dict[str, Any]] = []
        self.rows = 0

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
            self.rows -= last["rows"]
            table = self.lake.read_parquet(last["path"])
            self.pending.insert(0, table)
            self.pending_bytes += table.nbytes
        self._drain(0.0)
        return self.shards

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
        rel = f"{self.prefix}/part-{len(self.shards):05d}-{self.tag}.parquet"
        self.lake.write_bytes(rel, data)
        self.shards.append({"path": rel, "rows": head.num_rows, "bytes": data.size,
                            "raw_bytes": head.nbytes,
                            "sha256": hashlib.sha256(memoryview(data)).hexdigest()})
        self.rows += head.num_rows
        # learn from what zstd really did, so later shards land nearer the target
        raw = sum(s["raw_bytes"] for s in self.shards)
        self.ratio = max(1.0, raw / max(1, sum(s["bytes"] for s in self.shards)))
        self.pending = [rest] if rest.num_rows else []
        self.pending_bytes = rest.nbytes if rest.num_rows else 0

    def paths(self) -> list[str]:
        return [s["path"] for s in self.shards]


class ErrorSink:
    """The version's errors table, written in parts so memory stays bounded."""

    def __init__(self, lake: Lake, prefix: str, tag: str, part_rows: int = 50_000) -> None:
        self.lake, self.prefix, self.tag, self.part_rows = lake, prefix, tag, part_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.count = 0
        self.by_type: Counter[str] = Counter()
        self.first: list[tuple[str, str]] = []
        self.files: list[str] = []

    def add(self, failed: pa.Table) -> None:
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
        if len(self.first) < 5:
            for uri, kind in zip(table.column("source_uri").to_pylist(),
                                 table.column("error_type").to_pylist(), strict=True):
                self.first.append((uri, kind))
            del self.first[5:]
        self.pending.append(table)
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rel = f"{self.prefix}/errors-{len(self.files):05d}-{self.tag}.parquet"
        self.lake.write_parquet(rel, pa.concat_tables(self.pending))
        self.files.append(rel)
        self.pending, self.pending_rows = [], 0


# ---------------------------------------------------------------------------- previous version
@dataclass
class Previous:
    """What the driver keeps of the previous version: one small record per image."""

    version: int
    manifest: dict[str, Any]
    rows: dict[bytes, tuple[int, int, str]]  # digest -> (shard index, labels+uri sig, split)
    known: np.ndarray                        # sorted "S32" digests, shipped to the decoders
    present: Counter[int] = field(default_factory=Counter)
    changed: dict[int, dict[str, tuple[list[str] | None, str]]] = field(
        default_factory=lambda: defaultdict(dict))


def _sig(labels: list[str] | None, uri: str) -> int:
    return hash((None if labels is None else tuple(labels), uri))


def content_options(spec: dict[str, Any], fmt: str, salt_id: str) -> dict[str, Any]:
    """What decides the bytes of a shard row: a previous version is reused only when equal."""
    return {"format": fmt, "image_size": spec["image_size"], "channels": spec["channels"],
            "keep_original": spec["keep_original"], "max_pixels": spec["max_pixels"],
            "val_percent": spec["val_percent"], "test_percent": spec["test_percent"],
            "salt_id": salt_id}


def load_previous(lake: Lake, name: str, source: str, content: dict[str, Any],
                  job_id: str) -> Previous | None:
    versions = catalog.committed_versions(lake, name)
    if not versions:
        return None
    manifest = catalog.manifest(lake, name, versions[-1])
    if manifest.get("source") != source:
        log.info("[%s] %s:%d came from %s: staging everything anew", job_id, name, versions[-1],
                 manifest.get("source"))
        return None
    if manifest.get("content_options") != content:
        log.info("[%s] %s:%d was staged with other options %s: staging everything anew", job_id,
                 name, versions[-1], manifest.get("content_options"))
        return None
    rows: dict[bytes, tuple[int, int, str]] = {}
    for index, shard in enumerate(manifest["shards"]):
        t = lake.read_parquet(shard["path"], columns=["image_id", "labels", "source_uri",
                                                       "split"])
        for iid, labels, uri, split in zip(*(t.column(i).to_pylist() for i in range(4)),
                                           strict=True):
            rows[bytes.fromhex(iid)] = (index, _sig(labels, uri), split)
    known = np.sort(np.array(list(rows), dtype="S32")) if rows else np.array([], dtype="S32")
    return Previous(versions[-1], manifest, rows, known)


# ---------------------------------------------------------------------------- the job
@dataclass
class _Tally:
    files: int = 0
    bytes_read: int = 0
    duplicates: int = 0
    reused: int = 0
    new_bytes: int = 0
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    by_split: Counter[str] = field(default_factory=Counter)
    seen: set[bytes] = field(default_factory=set)
    first_batch_at: float | None = None
    first_batch_files: int = 0

    def stream_rate(self) -> float | None:
        """Files/s after the first decoded batch (start-up excluded); None if too short."""
        if self.first_batch_at is None or self.files <= self.first_batch_files:
            return None
        return (self.files - self.first_batch_files) / max(
            1e-6, time.monotonic() - self.first_batch_at)

    def count(self, split: str, labels: list[str] | None) -> None:
        self.by_split[split] += 1
        if labels is None:
            self.counts[split]["(unknown)"] += 1
        elif not labels:
            self.counts[split]["(none)"] += 1
        else:
            self.counts[split].update(labels)


def _decoded_batches(listing: sources.Listing, options: dict[str, Any], batch: int) -> Any:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # first copy of a duplicate wins, every time
    # Decoded blocks wait in the object store until the shard writer takes them. A fixed budget
    # (Ray Data's default is a share of the node's store, which a big collection fills) keeps
    # the memory of staging flat however large the collection is.
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=sources.STAGE_STORE_BYTES)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if listing.format == "npz":
        ds = ray.data.from_arrow(listing.items).map_batches(
            sources.read_npz_member, batch_size=1, batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=max(1, listing.items.num_rows)),
            num_cpus=0)  # streaming inflate: light next to decoding, must not take a decoder CPU
        batch, batches = sources.NPZ_CHUNK, math.ceil(listing.inputs / sources.NPZ_CHUNK)
    else:
        n = listing.items.num_rows
        per_item = options["image_size"] ** 2 * options["channels"] + 512
        if options["keep_original"]:
            sizes = listing.items.column("size")
            per_item += float(pc.mean(sizes).as_py() or 0) if sizes.null_count < n else 1e6
        step = sources.items_per_block(n, batch, cpus, per_item)
        # take() copies: a slice would pickle the whole table's buffers into every block
        ds = ray.data.from_arrow([listing.items.take(np.arange(i, min(n, i + step)))
                                  for i in range(0, n, step)])
        batches = math.ceil(n / batch)
    workers = min(cpus, max(1, batches))
    return ds.map_batches(
        sources.BatchDecoder, fn_constructor_args=(options,), batch_size=batch,
        batch_format="pyarrow", num_cpus=1,
        # Ray Data restarts a dead actor and retries its batch (max_restarts and
        # max_task_retries -1): the crash guard then skips the input that killed it
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers, initial_size=workers),
    ).iter_batches(batch_format="pyarrow", batch_size=None)


class _Stager:
    def __init__(self, spec: dict[str, Any], lake: Lake, job_id: str) -> None:
        self.spec, self.lake, self.job_id = spec, lake, job_id
        self.name = spec["dataset"]
        self.started = time.monotonic()
        self.tag = hashlib.sha256(job_id.encode()).hexdigest()[:8]
        self.tally = _Tally()
        self.writer: ShardWriter | None = None
        self.errors: ErrorSink | None = None
        self.base = ""
        self._last_log = time.monotonic()

    def run(self) -> dict[str, Any]:
        import ray

        spec, lake, job_id = self.spec, self.lake, self.job_id
        listing = sources.list_source(spec)
        log.info("[%s] %s: %d inputs (%s), labels %s, %d other files skipped, listed in %.1fs",
                 job_id, self.name, listing.inputs, listing.format, listing.label_names,
                 listing.skipped, time.monotonic() - self.started)
        salt_id = sources.salt_fingerprint()
        content = content_options(spec, listing.format, salt_id)
        previous = load_previous(lake, self.name, spec["source"], content, job_id)
        version = catalog.next_version(lake, self.name)
        self.base = f"datasets/{self.name}/{version}"
        lake.write_json(f"{self.base}/_staging.json",
                        {"job_id": job_id, "started_at": now_utc().isoformat()})
        self.writer = ShardWriter(lake, f"{self.base}/shards", self.tag,
                                  int(spec["shard_mb"] * 1024 * 1024))
        self.errors = ErrorSink(lake, f"{self.base}/errors", self.tag)
        crash_dir = os.path.join(tempfile.gettempdir(), f"medray-stage-{self.tag}")
        options = {**spec, "label_names": listing.label_names, "multi_label": listing.multi_label,
                   "job_id": job_id, "salt_id": salt_id, "crash_dir": crash_dir,
                   "known": ray.put(previous.known) if previous and len(previous.known) else None}
        allowed = parse_max_errors(spec["max_errors"], listing.inputs)
        try:
            small = self._small_previous(previous)
            for batch in _decoded_batches(listing, options, int(spec["decode_batch"])):
                self._consume(batch, previous, listing.inputs, small)
                if self.errors.count > allowed:
                    raise InputError(self._too_many(allowed, listing.inputs))
            self._progress(listing.inputs, final=True)
            rate = self.tally.stream_rate()
            reused = self._carry(previous)
            shards = reused + self.writer.close()
            self.errors.flush()
            images = len(self.tally.seen)
            if images == 0:
                raise InputError(f"no image of {spec['source']} could be staged "
                                 f"({self.errors.count} errors: {dict(self.errors.by_type)}); "
                                 f"first: {self.errors.first}")
            manifest = self._manifest(listing, version, shards, reused, previous, content)
            if lake.exists(f"{self.base}/manifest.json"):
                raise InfraError(f"version {version} of {self.name} was committed by another "
                                 "job meanwhile: run the stage again")
            lake.write_json(f"{self.base}/manifest.json", manifest)  # the commit point
        except BaseException:
            self._tidy()
            raise
        finally:
            shutil.rmtree(crash_dir, ignore_errors=True)
        lake.delete(f"{self.base}/_staging.json")
        log.info("[%s] committed %s:%d: %d images (%d new, %d reused) in %d shards (%d reused), "
                 "%d duplicates, %d errors, %.1fs", job_id, self.name, version, images,
                 manifest["new_images"], self.tally.reused, len(shards), len(reused),
                 self.tally.duplicates, self.errors.count, manifest["staging_seconds"])
        return {"dataset": self.name, "version": version, "images": images,
                "new_images": manifest["new_images"], "reused_images": self.tally.reused,
                "errors": self.errors.count, "duplicates": self.tally.duplicates,
                "files": self.tally.files, "bytes_read": self.tally.bytes_read,
                "shards": len(shards), "reused_shards": len(reused),
                "uri": lake.full_uri(self.base),
                "errors_uri": lake.full_uri(f"{self.base}/errors") if self.errors.files else None,
                "seconds": manifest["staging_seconds"],
                "stream_files_per_s": None if rate is None else round(rate, 1)}

    # -- streaming --------------------------------------------------------------------------
    def _small_previous(self, previous: Previous | None) -> set[int]:
        """Previous shards under a quarter of the target (balanced shards are at least about
        half): merged into new shards when rows are written anyway, so nightly growth does not
        pile up small shards."""
        if previous is None:
            return set()
        quarter = 0.25 * self.spec["shard_mb"] * 1024 * 1024
        return {i for i, s in enumerate(previous.manifest["shards"]) if s["bytes"] < quarter}

    def _consume(self, batch: pa.Table, previous: Previous | None, inputs: int,
                 small: set[int]) -> None:
        assert self.writer is not None and self.errors is not None
        t = self.tally
        if t.first_batch_at is None:  # from here on the pipeline streams: its steady rate
            t.first_batch_at, t.first_batch_files = time.monotonic(), batch.num_rows
        t.files += batch.num_rows
        t.bytes_read += int(pc.sum(batch.column("_bytes")).as_py() or 0)
        failed = pc.is_valid(batch.column("_error_type"))
        self.errors.add(batch.filter(failed))
        good = batch.filter(pc.invert(failed))
        keep: list[int] = []
        cols = [good.column(n).to_pylist() for n in ("image_id", "_known", "labels",
                                                      "source_uri", "split")]
        for i, (iid, known, labels, uri, split) in enumerate(zip(*cols, strict=True)):
            digest = bytes.fromhex(iid)
            if digest in t.seen:
                t.duplicates += 1
                continue
            t.seen.add(digest)
            if known:
                if previous is None or digest not in previous.rows:  # cannot happen: say so
                    log.error("[%s] %s was reported as known but is not in the previous "
                              "version; skipped", self.job_id, uri)
                    continue
                index, sig, old_split = previous.rows[digest]
                previous.present[index] += 1
                if _sig(labels, uri) != sig:
                    previous.changed[index][iid] = (labels, uri)
                t.reused += 1
                t.count(old_split, labels)  # an image keeps its split across versions
                continue
            t.count(split, labels)
            keep.append(i)
        if keep:
            table = good if len(keep) == good.num_rows else good.take(keep)
            table = table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
            t.new_bytes += table.nbytes
            self.writer.add(table, self._more_bytes(inputs, previous, small))
        if time.monotonic() - self._last_log > PROGRESS_SECONDS:
            self._progress(inputs)

    def _more_bytes(self, inputs: int, previous: Previous | None, small: set[int]) -> float:
        t = self.tally
        per_input = t.new_bytes / max(1, t.files)
        more = (inputs - t.files) * per_input
        if previous is not None:
            more += sum(previous.manifest["shards"][i].get("raw_bytes", 0) for i in small)
        return more

    def _progress(self, inputs: int, final: bool = False) -> None:
        assert self.errors is not None
        t = self.tally
        elapsed = max(1e-6, time.monotonic() - self.started)
        log.info("[%s] %s: %d/%d files (%.0f%%), %.1f MB read, %.1f files/s, %.2f MB/s, "
                 "%d images, %d duplicates, %d errors%s", self.job_id,
                 "done" if final else "progress", t.files, inputs,
                 100.0 * t.files / max(1, inputs), t.bytes_read / 1e6, t.files / elapsed,
                 t.bytes_read / 1e6 / elapsed, len(t.seen), t.duplicates, self.errors.count,
                 f", {len(self.writer.shards)} shards written" if self.writer else "")
        self._last_log = time.monotonic()

    def _too_many(self, allowed: int, inputs: int) -> str:
        assert self.errors is not None
        return (f"{self.errors.count} of {inputs} inputs failed, more than --max-errors "
                f"{self.spec['max_errors']} allows ({allowed}); nothing was committed. "
                f"Errors by type: {dict(self.errors.by_type)}; first: {self.errors.first}. "
                "Fix or remove those inputs, or raise --max-errors")

    # -- reuse ------------------------------------------------------------------------------
    def _carry(self, previous: Previous | None) -> list[dict[str, Any]]:
        """Previous shards listed as they are; the others' surviving rows go to the writer."""
        assert self.writer is not None
        if previous is None:
            return []
        shards = previous.manifest["shards"]
        small = self._small_previous(previous)
        whole = {i for i, s in enumerate(shards)
                 if previous.present[i] == s["rows"] and not previous.changed.get(i)}
        partial = [i for i in range(len(shards)) if previous.present[i] and i not in whole]
        # small shards are merged only when rows are written anyway (new or partial ones):
        # re-staging an unchanged source keeps every shard
        merging = bool(self.writer.pending_bytes or self.writer.shards or partial)
        rewrite = partial + sorted(i for i in whole if merging and i in small)
        kept = [s for i, s in enumerate(shards) if i in whole and i not in rewrite]
        left = [float(shards[i].get("raw_bytes", 0)) for i in rewrite]
        for n, i in enumerate(rewrite):
            self.writer.add(self._surviving_rows(previous, i), sum(left[n + 1:]))
        if rewrite:
            log.info("[%s] rewrote %d previous shards (lost images, new labels or small)",
                     self.job_id, len(rewrite))
        return kept

    def _surviving_rows(self, previous: Previous, index: int) -> pa.Table:
        table = self.lake.read_parquet(previous.manifest["shards"][index]["path"])
        ids = table.column("image_id").to_pylist()
        mask = [previous.rows.get(bytes.fromhex(i), (-1,))[0] == index and
                bytes.fromhex(i) in self.tally.seen for i in ids]
        table = table.filter(pa.array(mask))
        changes = previous.changed.get(index) or {}
        if changes:
            ids = table.column("image_id").to_pylist()
            labels = [changes[i][0] if i in changes else lab
                      for i, lab in zip(ids, table.column("labels").to_pylist(), strict=True)]
            uris = [changes[i][1] if i in changes else u
                    for i, u in zip(ids, table.column("source_uri").to_pylist(), strict=True)]
            table = table.set_column(table.schema.get_field_index("labels"), "labels",
                                     pa.array(labels, SHARD_SCHEMA.field("labels").type))
            table = table.set_column(table.schema.get_field_index("source_uri"), "source_uri",
                                     pa.array(uris, pa.string()))
        return table.cast(SHARD_SCHEMA)

    # -- commit -----------------------------------------------------------------------------
    def _manifest(self, listing: sources.Listing, version: int, shards: list[dict[str, Any]],
                  reused: list[dict[str, Any]], previous: Previous | None,
                  content: dict[str, Any]) -> dict[str, Any]:
        assert self.errors is not None
        spec, t = self.spec, self.tally
        counts = {split: dict(sorted(c.items())) for split, c in sorted(t.counts.items())}
        by_label: Counter[str] = Counter()
        for c in t.counts.values():
            by_label.update(c)
        return {
            "dataset": self.name, "version": version, "job_id": self.job_id,
            "created_at": now_utc().isoformat(),
            "staging_seconds": round(time.monotonic() - self.started, 2),
            "source": spec["source"], "format": listing.format,
            "labels": listing.label_names, "multi_label": listing.multi_label,
            "image_size": spec["image_size"], "channels": spec["channels"],
            "channel_layout": "gray" if spec["channels"] == 1 else "rgb",
            "pixel_layout": PIXEL_LAYOUT,
            "channel_conversion": ("RGB and colour inputs reduced to gray by ITU-R 601-2 luma"
                                   if spec["channels"] == 1 else
                                   "gray inputs repeated into R, G and B"),
            "images": len(t.seen), "new_images": len(t.seen) - t.reused,
            "reused_images": t.reused, "duplicates": t.duplicates,
            "errors": self.errors.count, "errors_by_type": dict(self.errors.by_type),
            "files": t.files, "bytes_read": t.bytes_read,
            "skipped_files": listing.skipped, "skipped_examples": listing.skipped_examples,
            "splits_from_source": listing.has_splits,
            "counts": counts,
            "images_by_split": dict(sorted(t.by_split.items())),
            "images_by_label": dict(sorted(by_label.items())),
            "shards": shards, "reused_shards": len(reused),
            "previous_version": previous.version if previous else None,
            "error_files": self.errors.files,
            "schema": SHARD_SCHEMA.to_string(show_schema_metadata=False),
            "deidentification": {
                "dicom": "DICOM PS3.15 Basic Application Level Confidentiality Profile before "
                         "anything is written; metadata keeps only non-identifying tags",
                "patient_key": "HMAC-SHA256 of the raw patient key with a secret salt",
                "salt_id": content["salt_id"]},
            "content_options": content,
            "options": {k: v for k, v in spec.items() if k not in ("source", "dataset", "lake")},
        }

    def _tidy(self) -> None:
        """A failed job removes what it wrote (never visible anyway: no manifest)."""
        written = (self.writer.paths() if self.writer else []) + (
            self.errors.files if self.errors else [])
        for rel in [*written, f"{self.base}/_staging.json"] if self.base else []:
            try:
                self.lake.delete(rel)
            except Exception as exc:  # noqa: BLE001 - tidying is best effort
                log.warning("[%s] could not delete %s: %s", self.job_id, rel, exc)
        try:
            if self.base and not self.lake.list_files(self.base, recursive=True):
                self.lake.delete_dir(self.base)
        except Exception as exc:  # noqa: BLE001
            log.warning("[%s] could not remove %s: %s", self.job_id, self.base, exc)


def _run_dict(spec: dict[str, Any], lake: Lake, job_id: str) -> dict[str, Any]:
    """Stage ``spec['source']`` into a new version of ``spec['dataset']`` (see module doc)."""
    return _Stager(spec, lake, job_id).run()


def run(spec: Any, lake: Any, ctx: Any) -> dict[str, Any]:  # transitional: typed spec below
    return _run_dict(spec.model_dump(), lake, ctx.job_id)
