"""The stage job: list sources, decode in parallel Ray tasks (streaming), write balanced
zstd Parquet shards, the errors table, and the manifest last."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster import catalog, sources
from medray.cluster.lake import Lake
from medray.workers.errors import InputError
from medray.workers.shards import (
    SHARD_SCHEMA,
    error_table,
    now_utc,
    parse_max_errors,
    split_for,
)

log = logging.getLogger(__name__)


class ShardWriter:
    """Collects rows and writes a shard each time about ``target_bytes`` of pixels are held."""

    def __init__(self, lake: Lake, prefix: str, target_bytes: int, first_index: int = 0) -> None:
        self.lake, self.prefix, self.target = lake, prefix, target_bytes
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0
        self.shards: list[dict[str, Any]] = []
        self.first_index = first_index

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_bytes += table.nbytes
        # hold up to 1.5 targets so the last shard is never a small remainder
        while self.pending_bytes >= 1.5 * self.target:
            self._flush(self.target)

    def close(self) -> None:
        while self.pending_bytes > 0:
            self._flush(self.pending_bytes)

    def _flush(self, nbytes: int) -> None:
        table = pa.concat_tables(self.pending)
        avg = max(1, table.nbytes // max(1, table.num_rows))
        rows = min(table.num_rows, max(1, nbytes // avg))
        head, rest = table.slice(0, rows), table.slice(rows)
        rel = f"{self.prefix}/part-{self.first_index + len(self.shards):05d}.parquet"
        size = self.lake.write_parquet(rel, head.combine_chunks())
        self.shards.append({"path": rel, "rows": head.num_rows, "bytes": size,
                            "sha256": hashlib.sha256(self.lake.read_bytes(rel)).hexdigest()})
        self.pending = [rest] if rest.num_rows else []
        self.pending_bytes = rest.nbytes if rest.num_rows else 0


def _previous(lake: Lake, name: str, source: str) -> tuple[dict[str, Any] | None, set[str]]:
    """The latest version staged from the same source, and its image ids."""
    versions = catalog.committed_versions(lake, name)
    if not versions:
        return None, set()
    manifest = catalog.manifest(lake, name, versions[-1])
    if manifest.get("source") != source:
        return None, set()
    ids: set[str] = set()
    for shard in manifest["shards"]:
        ids.update(lake.read_parquet(shard["path"], columns=["image_id"]).column(0).to_pylist())
    return manifest, ids


def run(spec: dict[str, Any], lake: Lake, job_id: str) -> dict[str, Any]:
    import ray

    started = time.monotonic()
    name = spec["dataset"]
    fmt = spec["format"] if spec["format"] != "auto" else sources.detect_format(spec["source"])
    multi_label = False
    label_names: list[str] = list(spec.get("label_names") or [])
    if fmt == "npz":
        items, _ = sources.list_npz(spec["source"])
        label_names, multi_label = sources.npz_label_names(spec["source"], spec.get("label_names"))
    elif fmt == "csv":
        items = sources.list_csv(spec["source"], spec["path_column"], spec["label_column"],
                                 spec["label_sep"], spec["no_finding"], spec["patient_column"],
                                 spec.get("images_root"))
        label_names = label_names or sources.all_labels(items)
        multi_label = True
    else:
        items = sources.list_folder(spec["source"], fmt)
        label_names = label_names or sources.all_labels(items)
    log.info("[%s] %s: %d work items (%s), labels %s", job_id, name, len(items), fmt, label_names)

    version = catalog.next_version(lake, name)
    base = f"datasets/{name}/{version}"
    lake.write_json(f"{base}/_staging.json", {"job_id": job_id, "started_at": str(now_utc())})
    previous, previous_ids = _previous(lake, name, spec["source"])
    options = {**spec, "label_names": label_names, "multi_label": multi_label}
    ds = ray.data.from_items([{"item": it} for it in items], override_num_blocks=min(
        len(items), 200))
    decoded = ds.map_batches(sources.BatchDecoder, fn_constructor_args=(options,),
                             batch_size=1 if fmt == "npz" else spec["decode_batch"],
                             batch_format="numpy", concurrency=(1, 8), num_cpus=1)

    writer = ShardWriter(lake, f"{base}/shards", int(spec["shard_mb"] * 1024 * 1024))
    seen: set[str] = set()
    present_previous: set[str] = set()
    errors: list[dict[str, Any]] = []
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    duplicates = files = 0
    nbytes = 0
    last_log = time.monotonic()
    for batch in decoded.iter_batches(batch_format="pyarrow", batch_size=None):
        files += batch.num_rows
        failed = pc.invert(pc.equal(pc.fill_null(batch.column("_error_type"), ""), ""))
        for row in batch.filter(failed).to_pylist():
            errors.append({"source_uri": row["source_uri"], "image_id": row["image_id"] or None,
                           "error_type": row["_error_type"], "message": row["_error_message"],
                           "stage": "decode"})
        good = batch.filter(pc.invert(failed)).select(SHARD_SCHEMA.names)
        keep = []
        for i, (iid, split, key, labels) in enumerate(zip(
                good.column("image_id").to_pylist(), good.column("split").to_pylist(),
                good.column("patient_key").to_pylist(), good.column("labels").to_pylist(),
                strict=True)):
            if iid in seen:
                duplicates += 1
                continue
            seen.add(iid)
            if not split:
                split = split_for(key or iid, spec["val_percent"], spec["test_percent"])
            counts[split].update(labels or ["(none)"] if labels is not None else ["(unknown)"])
            if iid in previous_ids:
                present_previous.add(iid)
                continue
            keep.append((i, split))
        if keep:
            table = good.take([i for i, _ in keep])
            table = table.set_column(table.schema.get_field_index("split"), "split",
                                     pa.array([s for _, s in keep], pa.string()))
            nbytes += table.nbytes
            writer.add(table.cast(SHARD_SCHEMA))
        if time.monotonic() - last_log > 5:
            rate = files / (time.monotonic() - started)
            log.info("[%s] progress: %d/%d files, %d images, %.1f MB, %.0f files/s, %d errors",
                     job_id, files, _expected(items), len(seen), nbytes / 1e6, rate, len(errors))
            last_log = time.monotonic()

    allowed = _allowed_errors(spec["max_errors"], files)
    if len(errors) > allowed:
        writer.pending = []
        for shard in writer.shards:  # never committed, so never visible; tidy up anyway
            lake.delete(shard["path"])
        raise InputError(f"{len(errors)} of {files} inputs failed, more than --max-errors "
                         f"{spec['max_errors']} ({allowed}); nothing was committed. "
                         f"First errors: {[(e['source_uri'], e['error_type']) for e in errors[:5]]}")
    writer.close()
    shards = list(writer.shards)
    reused = 0
    if previous and previous_ids:
        shards, reused = _carry_previous(lake, previous, present_previous, writer, shards, base)
    error_files = []
    if errors:
        rel = f"{base}/errors/errors-00000.parquet"
        lake.write_parquet(rel, error_table(errors))
        error_files.append(rel)
    manifest = {
        "dataset": name,
        "version": version,
        "created_at": now_utc().isoformat(),
        "job_id": job_id,
        "source": spec["source"],
        "format": fmt,
        "labels": label_names,
        "multi_label": multi_label,
        "image_size": spec["image_size"],
        "channels": spec["channels"],
        "channel_layout": "gray" if spec["channels"] == 1 else "rgb",
        "images": len(seen),
        "duplicates": duplicates,
        "errors": len(errors),
        "reused_images": reused,
        "counts": {split: dict(c) for split, c in sorted(counts.items())},
        "shards": shards,
        "error_files": error_files,
        "schema": SHARD_SCHEMA.to_string(show_schema_metadata=False),
        "options": {k: v for k, v in spec.items() if k not in ("source", "dataset", "lake")},
        "staging_seconds": round(time.monotonic() - started, 2),
    }
    lake.write_json(f"{base}/manifest.json", manifest)  # the commit point
    lake.delete(f"{base}/_staging.json")
    log.info("[%s] committed %s:%d: %d images in %d shards, %d duplicates, %d errors", job_id,
             name, version, len(seen), len(shards), duplicates, len(errors))
    return {"dataset": name, "version": version, "images": len(seen), "errors": len(errors),
            "duplicates": duplicates, "shards": len(shards), "uri": lake.full_uri(base)}


def _expected(items: list[dict[str, Any]]) -> int:
    return sum((it["stop"] - it["start"]) if it["kind"] == "npz" else 1 for it in items)


def _allowed_errors(max_errors: str, total: int) -> int:
    return parse_max_errors(max_errors, total)


def _carry_previous(lake: Lake, previous: dict[str, Any], present: set[str], writer: ShardWriter,
                    new_shards: list[dict[str, Any]], base: str) -> tuple[list[dict[str, Any]], int]:
    """Reuse previous shards whose images are all still in the source; rewrite the others."""
    carried: list[dict[str, Any]] = []
    reused = 0
    for shard in previous["shards"]:
        ids = lake.read_parquet(shard["path"], columns=["image_id"]).column(0).to_pylist()
        still = [i in present for i in ids]
        if all(still):
            carried.append(shard)
            reused += len(ids)
        elif any(still):
            table = lake.read_parquet(shard["path"]).filter(pa.array(still))
            rewriter = ShardWriter(lake, f"{base}/shards", 1 << 62,
                                   first_index=len(new_shards) + len(carried))
            rewriter.add(table)
            rewriter.close()
            carried.append(rewriter.shards[-1])
            reused += table.num_rows
    return carried + new_shards, reused
