"""The stage job on the job driver: list a source, decode it in Ray decoder actors (streaming,
``pipeline``) and write a new dataset version: balanced zstd Parquet shards, the errors table,
and the manifest last.

The version number is claimed (create-if-absent) before anything is written under it, so two
jobs staging one dataset never share a version. The driver holds at most about one shard of
pixels (``ShardWriter``), the set of image ids seen (for de-duplication) and one small record per
image of the previous version (for reuse); never the whole collection. A failed job deletes
what it wrote (its claim stays: the number is never reused); its manifest never exists, so
nothing of it is visible to any reader. DICOM paths reach the driver only to go to the private
linkage (``linkage``); rows, errors and logs carry pseudonyms (docs/deid.md).

Re-staging the same source with the same content options makes a new version that lists the
previous version's unchanged shards as they are (same paths), decodes only images it has not
seen, and rewrites only shards that lost images or are small, or whose images the source now
labels, splits or groups differently (``reuse``); the manifest counts the moves.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.infra import events
from medray.cluster.infra.context import JobContext
from medray.cluster.stage import dicomweb_source, pipeline, remote, reuse, sources
from medray.cluster.stage.listing import Listing
from medray.cluster.stage.reuse import Previous
from medray.cluster.stage.writer import ErrorSink, ShardWriter
from medray.cluster.store import catalog, history, layout, linkage
from medray.cluster.store.lake import Lake
from medray.cluster.store.linkage import LinkageSink
from medray.workers import dicomweb
from medray.workers.errors import InfraError, InputError
from medray.workers.shards import now_utc, parse_max_errors, shard_schema
from medray.workers.specs import StageSpec

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 5.0
PIXEL_LAYOUT = "uint8, row-major height x width x channels (HWC), one blob per image"
MB = 1024 * 1024


def run(spec: StageSpec, lake: Lake, ctx: JobContext) -> dict[str, Any]:
    """Stage ``spec.source`` into a new version of ``spec.dataset`` (see the module doc)."""
    started = time.monotonic()
    # --since-last: what earlier versions staged from the PACS is not even retrieved
    skip = dicomweb_source.staged_keys(lake, spec.dataset) if spec.since_last else None
    listing = sources.list_source(spec, skip)
    if skip is not None and listing.inputs == 0:  # a quiet night: no new, empty version
        log.info("%s: nothing new since the last version", spec.dataset)
        return {"dataset": spec.dataset, "version": None, "images": 0, "new_images": 0,
                "errors": 0, "duplicates": 0, "nothing_new": True}
    log.info("%s: %d inputs (%s), labels %s, %d other files skipped, listed in %.1fs",
             spec.dataset, listing.inputs, listing.format, listing.label_names, listing.skipped,
             time.monotonic() - started)
    salt_id = remote.salt_fingerprint()
    content = reuse.content_options(spec, listing.format, salt_id, listing.attributes)
    label = remote.source_label(spec.source, listing.format)
    previous = reuse.load_previous(lake, spec, content, label) if spec.reuse else None
    # claimed (create-if-absent) before anything is written under it: two jobs staging one
    # dataset at once get two versions, never one version with a mix of both
    version = catalog.claim_version(lake, spec.dataset, owner=ctx.job_id)
    lake.write_json(layout.staging_marker(spec.dataset, version),
                    {"job_id": ctx.job_id, "started_at": now_utc().isoformat()})
    # the claimed version in the job's record: `medray jobs show` names it while the job runs
    history.record(lake, ctx, spec, "RUNNING", {"dataset": spec.dataset, "version": version},
                   source_label=label)
    return _Version(spec, lake, ctx, version, started, label).stage(listing, previous, content)


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
    bad_attributes: Counter[str] = field(default_factory=Counter)  # values kept as null
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


class _Version:
    """One new version of a dataset being staged: its writers, its tally, its commit."""

    def __init__(self, spec: StageSpec, lake: Lake, ctx: JobContext, version: int,
                 started: float, source_label: str) -> None:
        self.spec, self.lake, self.ctx, self.version = spec, lake, ctx, version
        self.source = source_label  # a DICOM source: its pseudonym, never its path
        self.name = spec.dataset
        self.started = started
        self.tag = hashlib.sha256(ctx.job_id.encode()).hexdigest()[:8]
        self.tally = _Tally()
        self.attributes: tuple[tuple[str, str], ...] = ()  # the listing's, set by stage()
        self.schema = shard_schema()
        self.writer = ShardWriter(lake, functools.partial(layout.shard, self.name, version),
                                  self.tag, int(spec.shard_mb * MB))
        self.errors = ErrorSink(
            lake, functools.partial(layout.dataset_error_file, self.name, version), self.tag)
        self.linkage = LinkageSink(linkage.location(lake, self.name, version, spec.linkage))
        # a PACS source: which instances this version staged (keyed hashes, for --since-last)
        self.ledger = (dicomweb_source.Ledger() if dicomweb.is_dicomweb(spec.source)
                       else None)
        self._last_log = time.monotonic()
        self.bar: events.Phase | None = None

    def stage(self, listing: Listing, previous: Previous | None,
              content: dict[str, Any]) -> dict[str, Any]:
        spec, lake = self.spec, self.lake
        self.attributes, self.schema = listing.attributes, shard_schema(listing.attributes)
        self.tally.bad_attributes.update(listing.bad_attributes)
        crash_dir = os.path.join(tempfile.gettempdir(), f"medray-stage-{self.tag}")
        options = remote.DecodeOptions(
            label_names=tuple(listing.label_names), multi_label=listing.multi_label,
            salt_id=content["salt_id"], crash_dir=crash_dir, fmt=listing.format,
            known=previous.known if previous and len(previous.known) else None,
            attributes=listing.attributes)
        allowed = parse_max_errors(spec.max_errors, listing.inputs)
        small = previous.small(spec.shard_mb * MB) if previous else set()
        small_bytes = sum(float(previous.shards[i].get("raw_bytes", 0)) for i in small
                          ) if previous else 0.0
        bar = self.bar = events.Phase(f"staging {self.name}:{self.version}", "files",
                                      listing.inputs)
        # this line and the first batch's mark the start-up phases (bench/bench_stage.py)
        log.info("%s:%d: decode pipeline starting, %.1fs after the job's start", self.name,
                 self.version, time.monotonic() - self.started)
        try:
            for batch in pipeline.decoded_batches(listing, spec, options):
                self._consume(batch, previous, listing.inputs, small_bytes)
                if self.errors.count > allowed:
                    # a PACS that stopped answering is infrastructure, not bad input
                    down = self.errors.by_type.get("unreachable", 0) > allowed
                    raise (InfraError if down else InputError)(
                        self._too_many(allowed, listing.inputs))
            self._progress(listing.inputs, final=True)
            bar.finish(self.tally.files, **self._counts())
            rate = self.tally.stream_rate()
            reused = reuse.carry(previous, lake, self.writer, self.tally.seen, small,
                                 self.schema) if previous else []
            shards = reused + self.writer.close()
            self.errors.flush()
            self.linkage.flush()  # before the commit: a committed version can be traced back
            if self.ledger is not None:
                self.ledger.write(lake, self.name, self.version)
            images = len(self.tally.seen)
            if images == 0:
                raise InputError(f"no image of {self.source} could be staged "
                                 f"({self.errors.count} errors: {dict(self.errors.by_type)}); "
                                 f"first: {self.errors.first}")
            manifest = self._manifest(listing, shards, reused, previous, content)
            if lake.exists(layout.manifest(self.name, self.version)):
                raise InfraError(f"version {self.version} of {self.name} was committed by "
                                 "another job meanwhile: run the stage again")
            lake.write_json(layout.manifest(self.name, self.version), manifest)  # the commit
        except BaseException:
            self._tidy()
            raise
        finally:
            shutil.rmtree(crash_dir, ignore_errors=True)
        lake.delete(layout.staging_marker(self.name, self.version))
        for column, n in sorted(self.tally.bad_attributes.items()):
            log.warning("%s:%d: %d values of attribute %r could not be read: kept as null",
                        self.name, self.version, n, column)
        log.info("committed %s:%d: %d images (%d new, %d reused) in %d shards (%d reused), "
                 "%d duplicates, %d errors, %.1fs", self.name, self.version, images,
                 manifest["new_images"], self.tally.reused, len(shards), len(reused),
                 self.tally.duplicates, self.errors.count, manifest["staging_seconds"])
        base = layout.dataset_version(self.name, self.version)
        return {"dataset": self.name, "version": self.version, "images": images,
                "new_images": manifest["new_images"], "reused_images": self.tally.reused,
                "errors": self.errors.count, "duplicates": self.tally.duplicates,
                "files": self.tally.files, "bytes_read": self.tally.bytes_read,
                "shards": len(shards), "reused_shards": len(reused),
                "moved_images": manifest["moved_images"],
                "attributes": [c for c, _ in listing.attributes],
                "unreadable_attribute_values": manifest["unreadable_attribute_values"],
                "rekeyed_images": manifest["rekeyed_images"],
                "uri": lake.full_uri(base),
                "errors_uri": (lake.full_uri(layout.dataset_errors_dir(self.name, self.version))
                               if self.errors.files else None),
                "seconds": manifest["staging_seconds"],
                "stream_files_per_s": None if rate is None else round(rate, 1)}

    # -- streaming --------------------------------------------------------------------------
    def _consume(self, batch: pa.Table, previous: Previous | None, inputs: int,
                 small_bytes: float) -> None:
        t = self.tally
        if t.first_batch_at is None:  # from here on the pipeline streams: its steady rate
            t.first_batch_at, t.first_batch_files = time.monotonic(), batch.num_rows
            log.info("%s:%d: first decoded batch, %.1fs after the job's start", self.name,
                     self.version, t.first_batch_at - self.started)
        t.files += batch.num_rows
        t.bytes_read += int(pc.sum(batch.column("_bytes")).as_py() or 0)
        self.linkage.add(batch.column("source_uri").to_pylist(),
                         batch.column("_raw_uri").to_pylist())
        failed = pc.is_valid(batch.column("_error_type"))
        if self.ledger is not None:
            self.ledger.add(batch.column("_raw_uri").to_pylist(), failed.to_pylist())
        self.errors.add(batch.filter(failed))
        good = batch.filter(pc.invert(failed))
        keep: list[int] = []
        for bad in good.column("_bad_attributes").to_pylist():
            t.bad_attributes.update(bad or ())
        names = ("image_id", "_known", "labels", "source_uri", "split", "patient_key",
                 "_keep_key")
        cols = [good.column(n).to_pylist() for n in names]
        kept = [n for n, _ in self.attributes]
        attrs = good.select(kept).to_pylist() if kept else [None] * good.num_rows
        for i, (iid, known, labels, uri, split, key, keep_key) in enumerate(zip(*cols,
                                                                              strict=True)):
            digest = bytes.fromhex(iid)
            if digest in t.seen:
                t.duplicates += 1
                continue
            t.seen.add(digest)
            if known:
                # a DICOM's attributes are in its unchanged bytes (keep_key): as before
                now = previous.take(iid, labels, uri, split, key, bool(keep_key),
                                    None if keep_key else attrs[i]) if previous else None
                if now is None:  # cannot happen: say so
                    log.error("an input was reported as known but is not in the previous "
                              "version; skipped")
                    continue
                t.reused += 1
                t.count(now[0], labels)
                continue
            t.count(split, labels)
            keep.append(i)
        if keep:
            table = good if len(keep) == good.num_rows else good.take(keep)
            table = table.select(self.schema.names).cast(self.schema)
            t.new_bytes += table.nbytes
            more = (inputs - t.files) * (t.new_bytes / max(1, t.files)) + small_bytes
            self.writer.add(table, more)
        if self.bar is not None:
            self.bar.update(t.files, **self._counts())
        if time.monotonic() - self._last_log > PROGRESS_SECONDS:
            self._progress(inputs)

    def _counts(self) -> dict[str, Any]:
        """What a progress event of the staging says besides the files done."""
        t = self.tally
        return {"images": len(t.seen), "duplicates": t.duplicates, "errors": self.errors.count,
                "bytes": t.bytes_read}

    def _progress(self, inputs: int, final: bool = False) -> None:
        t = self.tally
        elapsed = max(1e-6, time.monotonic() - self.started)
        log.info("%s: %d/%d files (%.0f%%), %.1f MB read, %.1f files/s, %.2f MB/s, "
                 "%d images, %d duplicates, %d errors, %d shards written",
                 "done" if final else "progress", t.files, inputs,
                 100.0 * t.files / max(1, inputs), t.bytes_read / 1e6, t.files / elapsed,
                 t.bytes_read / 1e6 / elapsed, len(t.seen), t.duplicates, self.errors.count,
                 len(self.writer.shards))
        self._last_log = time.monotonic()

    def _too_many(self, allowed: int, inputs: int) -> str:
        return (f"{self.errors.count} of {inputs} inputs failed, more than --max-errors "
                f"{self.spec.max_errors} allows ({allowed}); nothing was committed. "
                f"Errors by type: {dict(self.errors.by_type)}; first: {self.errors.first}. "
                "Fix or remove those inputs, or raise --max-errors")

    # -- commit -----------------------------------------------------------------------------
    def _manifest(self, listing: Listing, shards: list[dict[str, Any]],
                  reused: list[dict[str, Any]], previous: Previous | None,
                  content: dict[str, Any]) -> dict[str, Any]:
        spec, t = self.spec, self.tally
        counts = {split: dict(sorted(c.items())) for split, c in sorted(t.counts.items())}
        by_label: Counter[str] = Counter()
        for c in t.counts.values():
            by_label.update(c)
        return {
            "dataset": self.name, "version": self.version, "job_id": self.ctx.job_id,
            "created_at": now_utc().isoformat(),
            "staging_seconds": round(time.monotonic() - self.started, 2),
            "source": self.source, "format": listing.format,
            "labels": listing.label_names, "multi_label": listing.multi_label,
            "image_size": spec.image_size, "channels": spec.channels,
            "channel_layout": "gray" if spec.channels == 1 else "rgb",
            "pixel_layout": PIXEL_LAYOUT,
            "channel_conversion": ("RGB and colour inputs reduced to gray by ITU-R 601-2 luma"
                                   if spec.channels == 1 else
                                   "gray inputs repeated into R, G and B"),
            "images": len(t.seen), "new_images": len(t.seen) - t.reused,
            "reused_images": t.reused, "duplicates": t.duplicates,
            # reused images the source now puts in another split / under another patient
            "moved_images": previous.moved if previous else 0,
            "rekeyed_images": previous.rekeyed if previous else 0,
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
            "schema": self.schema.to_string(show_schema_metadata=False),
            # typed patient attribute columns (docs/staging.md); values unreadable as their
            # type were kept as null, counted per column
            "attributes": [{"column": c, "kind": k} for c, k in listing.attributes],
            "unreadable_attribute_values": dict(sorted(t.bad_attributes.items())),
            "deidentification": {
                **remote.deid_options(spec).describe(),
                "dicom": "every DICOM de-identified before anything is written (docs/deid.md); "
                         "shard metadata keeps only non-identifying attributes",
                "burned_in": ("staged (--allow-burned-in)" if spec.allow_burned_in else
                              "refused: errors rows burned_in_annotation"),
                "paths": "DICOM source paths replaced by keyed pseudonyms (dicom:<hash>); the "
                         "linkage is private (medray datasets reveal)",
                "linkage_entries": self.linkage.entries,
                "originals": "DICOM de-identified; JPEG and PNG without metadata; other "
                             "formats not kept",
                "patient_key": "HMAC-SHA256 of the raw patient key with a secret salt",
                "salt_id": content["salt_id"]},
            "content_options": content,
            # the spec as JSON in the manifest: what the version was staged with
            "options": spec.model_dump(exclude={"source", "dataset", "lake"}),
        }

    def _tidy(self) -> None:
        """A failed job removes what it wrote (never visible anyway: no manifest)."""
        try:
            self.linkage.remove()
        except OSError as exc:
            log.warning("could not remove the linkage of a failed staging: %s", exc)
        base = layout.dataset_version(self.name, self.version)
        written = self.writer.paths() + self.errors.files
        if self.ledger is not None:
            written.append(layout.dicomweb_instances(self.name, self.version))
        for rel in [*written, layout.staging_marker(self.name, self.version)]:
            try:
                self.lake.delete(rel)
            except Exception as exc:  # noqa: BLE001 - tidying is best effort
                log.warning("could not delete %s: %s", rel, exc)
        try:
            if not self.lake.list_files(base, recursive=True):
                self.lake.delete_dir(base)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not remove %s: %s", base, exc)
