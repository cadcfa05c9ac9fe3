"""The score job: dataset shards -> reader actors -> scorer actor pool -> one prediction file per
input shard -> a commit marker listing every file. Resumable and exactly-once per run.

A run in the lake::

    runs/<run_id>/run.json                       what the run scores, frozen at its first start
    runs/<run_id>/actors/<actor>.json            node, GPUs and precision of each scorer actor
    runs/<run_id>/errors/[date=D/]<shard>.parquet     images that could not be scored
    runs/<run_id>/predictions/[date=D/]<shard>.parquet   one per input shard, written last
    runs/<run_id>/_COMMITTED.json                the commit point: lists every file
    indexes/scored/<model>/<version>/<dataset>/<run_id>.parquet   image ids the run scored

Exactly once: a shard's prediction file is written (atomically) only when all its rows are
scored, and a resumed run (same --run-id) skips the shards that have one. Everything a resume
could see differently (dataset and model version, the --only-new baseline, the date partition)
is frozen in run.json at the first start. The index file is written before the marker and
counts only once its run is committed, so --only-new never trusts an uncommitted run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.store import catalog, layout, registry, runs
from medray.cluster.store.lake import Lake
from medray.cluster.store.layout import shard_stem
from medray.cluster.store.runs import (
    is_committed,
    new_run_id,
    read_commit,
    scored_ids,
)
from medray.workers.errors import ConfigError, InfraError, InputError
from medray.workers.models import ModelCard
from medray.workers.scorer import INPUT_COLUMNS, Scorer, prediction_schema
from medray.workers.shards import error_table, now_utc

log = logging.getLogger(__name__)
# what a resume must agree on with the run's first start
_FROZEN = ("dataset", "model", "split", "only_new", "retry_failed", "partition_by")
# Reading a shard is mostly I/O and decompression: the reader takes no CPU slot, so scorer
# actors may ask for every CPU of a node (e.g. --cpus-per-actor 2 on a 2-core laptop)
_READER_CPUS = 0.0
_ROWS_PER_BLOCK = 1024


# ------------------------------------------------------------------ checks before submitting
def cluster_gpus(address: str | None) -> float | None:
    """GPUs of the cluster's alive nodes from its dashboard; None when it cannot tell."""
    from medray.cluster.infra import jobs_client

    try:
        resp = jobs_client.client(address)._do_request("GET", "/nodes?view=summary")
        if resp.status_code != 200:
            return None
        nodes = resp.json().get("data", {}).get("summary", [])
    except Exception as exc:  # noqa: BLE001 - the job checks again on the cluster
        log.debug("cannot read the cluster's GPUs before submitting: %s", exc)
        return None
    return float(sum(n.get("raylet", {}).get("resourcesTotal", {}).get("GPU", 0) for n in nodes
                     if n.get("raylet", {}).get("state") == "ALIVE"))


def _no_gpu_message(gpus: float, have: float) -> str:
    return (f"--gpus-per-actor {gpus:g} but the cluster has {have:g} GPU(s): start the cluster "
            "with GPUs (`medray cluster up --num-gpus N` or a GPU node type), drop "
            "--gpus-per-actor, or pass --allow-cpu to score on CPUs")


def precheck(spec: dict[str, Any], lake: Lake, address: str | None = None) -> None:
    """What a score job would refuse, checked before it is submitted (the CLI exits 2)."""
    dataset, dversion, manifest = catalog.resolve(lake, spec["dataset"])
    card = registry.resolve(lake, spec["model"])
    _check_sizes(card, manifest, dataset, dversion)
    if spec.get("run_id"):
        _check_resume(lake, spec["run_id"], spec)
    if spec.get("retry_failed"):
        read_commit(lake, spec["retry_failed"])
    gpus = float(spec.get("gpus_per_actor") or 0)
    if gpus and not spec.get("allow_cpu"):
        have = cluster_gpus(address)
        if have is not None and have < gpus:
            raise ConfigError(_no_gpu_message(gpus, have))


def _check_sizes(card: ModelCard, manifest: dict[str, Any], dataset: str, dversion: int) -> None:
    if (manifest["image_size"], manifest["channels"]) != (card.input_size, card.channels):
        raise ConfigError(
            f"model {card.name}:{card.version} takes {card.input_size}px x{card.channels} but "
            f"dataset {dataset}:{dversion} holds {manifest['image_size']}px "
            f"x{manifest['channels']}: stage the images at the model's size"
        )


def _check_resume(lake: Lake, run_id: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse a committed run id or a resume with other options; the existing run.json."""
    if is_committed(lake, run_id):
        raise InputError(f"run {run_id!r} is already committed; pick a new --run-id "
                         "(or leave it out) to score again")
    existing = lake.read_json_or_none(layout.run_doc(run_id))
    if not existing:
        return None
    wanted = {
        "dataset": catalog.parse_ref(spec["dataset"])[0],
        "model": registry.parse_ref(spec["model"])[0],
        "split": spec.get("split"),
        "only_new": bool(spec.get("only_new")),
        "retry_failed": spec.get("retry_failed"),
        "partition_by": spec.get("partition_by") or "none",
    }
    for key in _FROZEN:
        if existing.get(key) != wanted[key]:
            raise InputError(f"run {run_id!r} was started with {key}={existing.get(key)!r}, not "
                             f"{wanted[key]!r}: resume it with the same options or use another "
                             "--run-id")
    _, dversion = catalog.parse_ref(spec["dataset"])
    _, mversion, _ = registry.parse_ref(spec["model"])
    for what, asked, frozen in (("dataset", dversion, existing["dataset_version"]),
                                ("model", mversion, existing["model_version"])):
        if asked is not None and asked != frozen:
            raise InputError(f"run {run_id!r} scores {what} version {frozen}, not {asked}: "
                             "resume it with the same version or use another --run-id")
    return dict(existing)


# ------------------------------------------------------------------ the Ray Data stages
class ShardReader:
    """Reads one shard (an item) and yields the rows to score, tagged with their shard.

    Only the id and split columns are read to decide which rows are wanted; pixels are read
    for wanted rows only, so an --only-new run over a grown dataset reads old shards' ids,
    not their pixels.
    """

    def __init__(self, lake_uri: str, split: str | None, skip: pa.Array | None,
                 only: pa.Array | None, rows_per_block: int = _ROWS_PER_BLOCK) -> None:
        self.lake = Lake(lake_uri)
        self.split, self.skip, self.only = split, skip, only
        self.rows_per_block = rows_per_block

    def wanted(self, keys: pa.Table) -> pa.Array:
        mask = pa.array([True] * keys.num_rows)
        if self.split:
            mask = pc.and_(mask, pc.equal(keys.column("split"), self.split))
        if self.skip is not None and len(self.skip):
            mask = pc.and_(mask, pc.invert(pc.is_in(keys.column("image_id"),
                                                    value_set=self.skip)))
        if self.only is not None:
            mask = pc.and_(mask, pc.is_in(keys.column("image_id"), value_set=self.only))
        return pc.fill_null(mask, False).combine_chunks() if isinstance(mask, pa.ChunkedArray) \
            else pc.fill_null(mask, False)

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        for item in batch["path"]:
            path = str(item)
            mask = self.wanted(self.lake.read_parquet(path, columns=["image_id", "split"]))
            total = pc.sum(mask).as_py() or 0
            if not total:
                continue  # the driver writes an empty file for a shard that yields nothing
            table = self.lake.read_parquet(path, columns=INPUT_COLUMNS)
            if total < table.num_rows:
                table = table.filter(mask)
            stem = shard_stem(path)
            for start in range(0, total, self.rows_per_block):
                part = table.slice(start, self.rows_per_block)
                part = part.append_column("_shard", pa.array([stem] * part.num_rows))
                part = part.append_column("_shard_rows",
                                          pa.array([total] * part.num_rows, pa.int64()))
                yield part


class ScorerActor:
    """The pure Scorer, with its model fetched from the lake once per actor."""

    def __init__(self, lake_uri: str, card: dict[str, Any], mixed_precision: bool, run_id: str,
                 job_id: str, threads: int | None = None) -> None:
        import ray

        lake = Lake(lake_uri)
        # a private copy: the shared per-name cache of registry.fetch is keyed by name and
        # version only, so two lakes (or two actors writing it at once) could mix files up
        cache = tempfile.mkdtemp(prefix="medray-scorer-")
        try:
            path = registry.fetch(lake, ModelCard.from_dict(card), cache_dir=cache)
            self.scorer = Scorer(path, card, mixed_precision=mixed_precision, threads=threads)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        ctx = ray.get_runtime_context()
        info = {"actor_id": ctx.get_actor_id(), "node_id": ctx.get_node_id(), "pid": os.getpid(),
                "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "tensorflow_gpus": self.scorer.gpus, "precision": self.scorer.precision,
                "started_at": now_utc().isoformat(), "job_id": job_id}
        lake.write_json(layout.run_actor(run_id, info["actor_id"] or str(os.getpid())), info)
        log.info("[%s] scorer actor %s on node %s: Ray GPUs %s, TensorFlow GPUs %s, %s", job_id,
                 info["actor_id"], info["node_id"], info["ray_gpu_ids"], info["tensorflow_gpus"],
                 info["precision"])

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.scorer(table)


# ------------------------------------------------------------------ the job
def _gpus_for_actors(spec: dict[str, Any], job_id: str) -> float:
    import ray

    gpus = float(spec.get("gpus_per_actor") or 0)
    have = float(ray.cluster_resources().get("GPU", 0))
    if gpus and have < gpus:
        if not spec.get("allow_cpu"):
            raise ConfigError(_no_gpu_message(gpus, have))
        log.warning("[%s] --gpus-per-actor %g but the cluster has %g GPU(s): scoring on CPUs "
                    "(--allow-cpu)", job_id, gpus, have)
        return 0.0
    return gpus


def _check_cpus(spec: dict[str, Any], gpus: float) -> None:
    import ray

    cpus = float(ray.cluster_resources().get("CPU", 0))
    asked = int(spec["actors"]) * float(spec["cpus_per_actor"]) + _READER_CPUS
    if asked > cpus:  # Ray Data would wait for the missing actors forever
        raise ConfigError(f"{spec['actors']} actor(s) x {spec['cpus_per_actor']:g} CPU(s) need "
                          f"{asked:g} CPUs but the cluster has {cpus:g}: lower --actors or "
                          "--cpus-per-actor")


def _start_run(lake: Lake, spec: dict[str, Any], job_id: str) -> tuple[dict[str, Any], bool]:
    """The run doc (new or the one frozen at the first start) and whether this is a resume."""
    existing = _check_resume(lake, spec["run_id"], spec) if spec.get("run_id") else None
    if existing:
        attempts = [*existing.get("attempts", []), {"job_id": job_id,
                                                    "started_at": now_utc().isoformat()}]
        doc = {**existing, "attempts": attempts}
        lake.write_json(layout.run_doc(doc["run_id"]), doc)
        return doc, True
    dataset, dversion, _ = catalog.resolve(lake, spec["dataset"])
    card = registry.resolve(lake, spec["model"])
    assert card.version is not None
    run_id = spec.get("run_id") or new_run_id(card.name, card.version)
    started = now_utc()
    doc = {"run_id": run_id, "job_id": job_id, "dataset": dataset, "dataset_version": dversion,
           "model": card.name, "model_version": card.version, "model_ref": spec["model"],
           "split": spec.get("split"), "only_new": bool(spec.get("only_new")),
           "retry_failed": spec.get("retry_failed"),
           "partition_by": spec.get("partition_by") or "none",
           "partition_date": started.date().isoformat(), "labels": card.labels,
           "multi_label": card.multi_label, "thresholds": card.thresholds,
           "started_at": started.isoformat(),
           # the --only-new baseline: the runs committed now, so a resume skips the same images
           "only_new_runs": runs.indexed_runs(lake, card.name, card.version, dataset)
           if spec.get("only_new") else [],
           "attempts": [{"job_id": job_id, "started_at": started.isoformat()}]}
    lake.write_json(layout.run_doc(run_id), doc)
    if doc["only_new"]:
        _warn_concurrent_only_new(lake, doc, job_id)
    return doc, False


def _warn_concurrent_only_new(lake: Lake, doc: dict[str, Any], job_id: str) -> None:
    """Two uncommitted --only-new runs cannot see each other's images: say so.

    The lake has no atomic create-if-absent to make a lock of, so this warns rather than
    refuses; a run that was killed and never resumed would otherwise block every later one.
    """
    inflight = layout.scored_inflight(doc["model"], doc["model_version"], doc["dataset"])
    others = [f.rsplit("/", 1)[-1].removesuffix(".json") for f in lake.list_files(inflight)
              if f.endswith(".json")]
    for other in others:
        if other != doc["run_id"] and not is_committed(lake, other):
            log.warning("[%s] run %s (--only-new, same model version and dataset) is not "
                        "committed: images new to both runs are scored by both. Resume or "
                        "finish %s before the next --only-new run", job_id, other, other)
    lake.write_json(f"{inflight}/{doc['run_id']}.json", {"job_id": job_id,
                                                         "started_at": doc["started_at"]})


def _run_dict(spec: dict[str, Any], lake: Lake, job_id: str) -> dict[str, Any]:
    started = time.monotonic()
    doc, resumed = _start_run(lake, spec, job_id)
    run_id = doc["run_id"]
    if resumed:
        log.info("[%s] resuming run %s (started %s)", job_id, run_id, doc["started_at"])
    dataset, dversion, manifest = catalog.resolve(lake, f"{doc['dataset']}:"
                                                        f"{doc['dataset_version']}")
    card = registry.resolve(lake, f"{doc['model']}:{doc['model_version']}")
    assert card.version is not None
    _check_sizes(card, manifest, dataset, dversion)
    gpus = _gpus_for_actors(spec, job_id)
    _check_cpus(spec, gpus)

    base = layout.run_root(run_id)
    date_dir = f"date={doc['partition_date']}/" if doc["partition_by"] == "date" else ""
    stems = {shard_stem(s["path"]): s["path"] for s in manifest["shards"]}
    done = _written(lake, f"{base}/predictions")
    pending = [path for stem, path in stems.items() if stem not in done]
    skip = scored_ids(lake, card.name, card.version, dataset, doc["only_new_runs"]) \
        if doc["only_new"] else None
    only = None
    if doc.get("retry_failed"):
        failed = runs.read_errors(lake, doc["retry_failed"]).column("image_id")
        only = pc.unique(pc.drop_null(failed).combine_chunks())
    log.info("[%s] run %s: %s:%d with %s:%d, %d shards, %d already written, %d to score%s%s",
             job_id, run_id, dataset, dversion, card.name, card.version, len(stems),
             len(stems) - len(pending), len(pending),
             f", skipping {len(skip)} images scored by earlier runs" if skip is not None else "",
             f", retrying {len(only)} failed images of {doc['retry_failed']}"
             if only is not None else "")
    if pending:
        _score_shards(spec, lake, job_id, card, pending, skip, only, base, date_dir, run_id, gpus,
                      set(_written(lake, f"{base}/errors")))
    return _commit(lake, doc, card, stems, base, date_dir, job_id, started, gpus,
                   len(stems) - len(pending))


def _written(lake: Lake, rel: str) -> dict[str, str]:
    """shard stem -> relative path of the finished files under ``rel`` (temporaries skipped)."""
    out = {}
    for f in lake.list_files(rel, recursive=True):
        name = f.rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith("."):
            out[name.removesuffix(".parquet")] = f
    return out


def _commit(lake: Lake, doc: dict[str, Any], card: ModelCard, stems: dict[str, str], base: str,
            date_dir: str, job_id: str, started: float, gpus: float,
            already: int) -> dict[str, Any]:
    run_id = doc["run_id"]
    written = _written(lake, f"{base}/predictions")
    missing = sorted(set(stems) - set(written))
    if missing:
        raise InfraError(f"run {run_id}: prediction files missing for {missing[:5]}; resume "
                         f"with the same --run-id {run_id}")
    files = sorted(written[s][len(base) + 1:] for s in stems)
    errors = _written(lake, f"{base}/errors")
    error_files = sorted(errors[s][len(base) + 1:] for s in stems if s in errors)
    ids = pa.chunked_array([lake.read_parquet(f"{base}/{f}", columns=["image_id"]).column(0)
                            for f in files], pa.string())
    if pc.count_distinct(ids).as_py() != len(ids):
        raise RuntimeError(f"run {run_id}: an image has two prediction rows; not committing")
    n_errors = sum(lake.read_parquet(f"{base}/{f}", columns=["image_id"]).num_rows
                   for f in error_files)
    actors = [lake.read_json(f) for f in lake.list_files(f"{base}/actors")
              if f.endswith(".json") and not f.rsplit("/", 1)[-1].startswith(".")]
    assert card.version is not None
    # the index goes first: it only counts once the marker below exists
    lake.write_parquet(layout.scored_index(card.name, card.version, doc["dataset"], run_id),
                       pa.table({"image_id": ids}))
    marker = {**doc, "files": files, "error_files": error_files, "images": len(ids),
              "errors": n_errors, "actors": actors, "gpus_per_actor": gpus,
              "committed_at": now_utc().isoformat(), "committed_by": job_id,
              "seconds": round(time.monotonic() - started, 2)}
    lake.write_json(layout.run_commit(run_id), marker)  # the commit point
    if doc["only_new"]:
        inflight = layout.scored_inflight(card.name, card.version, doc["dataset"])
        lake.delete(f"{inflight}/{run_id}.json")
    _tidy(lake, base)
    log.info("[%s] committed run %s: %d images scored, %d errors, %d files (%d from earlier "
             "attempts), %.1fs", job_id, run_id, len(ids), n_errors, len(files), already,
             time.monotonic() - started)
    return {"job_id": job_id, "run_id": run_id,
            "predictions_uri": lake.full_uri(f"{base}/predictions"),
            "errors_uri": lake.full_uri(f"{base}/errors"), "images": len(ids),
            "errors": n_errors, "model": card.name, "model_version": card.version,
            "dataset": doc["dataset"], "dataset_version": doc["dataset_version"],
            "shards": len(files), "resumed_shards": already,
            "device": "gpu" if gpus else "cpu", "seconds": marker["seconds"]}


def _tidy(lake: Lake, base: str) -> None:
    """Remove temporaries a killed attempt left in a local lake (S3 PUTs leave none)."""
    for f in lake.list_files(base, recursive=True):
        if f.rsplit("/", 1)[-1].startswith(".tmp-"):
            lake.delete(f)


def _score_shards(spec: dict[str, Any], lake: Lake, job_id: str, card: ModelCard,
                  pending: list[str], skip: pa.Array | None, only: pa.Array | None, base: str,
                  date_dir: str, run_id: str, gpus: float, stale_errors: set[str]) -> None:
    import ray

    # a CPU actor keeps TensorFlow to the CPUs Ray gave it; a GPU actor's threads feed the GPU
    threads = None if gpus else max(1, round(float(spec["cpus_per_actor"])))
    ds = ray.data.from_items([{"path": p} for p in pending], override_num_blocks=len(pending))
    rows = ds.map_batches(
        ShardReader,
        # one block per scorer batch, so the batches of even one shard spread over the pool
        fn_constructor_args=(lake.uri, spec.get("split"), skip, only, int(spec["batch_size"])),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(2, len(pending))),
        num_cpus=_READER_CPUS,
    )
    scored = rows.map_batches(
        ScorerActor,
        fn_constructor_args=(lake.uri, card.__dict__, bool(spec.get("mixed_precision")), run_id,
                             job_id, threads),
        batch_size=int(spec["batch_size"]),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=int(spec["actors"])),
        num_cpus=float(spec["cpus_per_actor"]),
        num_gpus=gpus or None,
    )
    meta = {"model": card.name, "model_version": card.version, "run_id": run_id}
    # only prediction rows (no pixels) wait here, and only for shards still in flight
    buffers: dict[str, list[pa.Table]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    written = images = 0
    t0 = last_log = time.monotonic()
    for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        for stem in pc.unique(batch.column("_shard")).to_pylist():
            part = batch.filter(pc.equal(batch.column("_shard"), stem))
            buffers[stem].append(part)
            counts[stem] += part.num_rows
            expected = part.column("_shard_rows")[0].as_py()
            if counts[stem] == expected:
                _write_shard(lake, base, date_dir, stem, pa.concat_tables(buffers.pop(stem)),
                             meta, stale_errors=stale_errors)
                written += 1
            elif counts[stem] > expected:
                raise RuntimeError(f"shard {stem}: {counts[stem]} rows for {expected} inputs")
        images += batch.num_rows
        if time.monotonic() - last_log > 5:
            rate = images / (time.monotonic() - t0)
            log.info("[%s] progress: %d images scored, %d/%d shards written, %.0f img/s",
                     job_id, images, written, len(pending), rate)
            last_log = time.monotonic()
    if buffers:
        raise RuntimeError(f"incomplete shards after scoring: {sorted(buffers)}")
    # shards with no rows to score (split, --only-new or --retry-failed left none) get a file
    for path in pending:
        stem = shard_stem(path)
        if stem not in counts:
            _write_shard(lake, base, date_dir, stem, None, meta, labels=card.labels,
                         stale_errors=stale_errors)
    log.info("[%s] scored %d images in %d shards, %.0f img/s after start-up", job_id, images,
             len(pending), images / max(1e-9, time.monotonic() - t0))


def _write_shard(lake: Lake, base: str, date_dir: str, stem: str, table: pa.Table | None,
                 meta: dict[str, Any], labels: list[str] | None = None,
                 stale_errors: set[str] | None = None) -> None:
    """Errors first, predictions last: a predictions file means the shard is complete."""
    if table is None:
        preds = prediction_schema(labels or []).empty_table().drop_columns(["error"])
        failed_rows: list[dict[str, Any]] = []
    else:
        table = table.drop_columns(["_shard", "_shard_rows"])
        failed = pc.invert(pc.is_null(table.column("error")))
        failed_rows = [{"source_uri": r["source_uri"], "image_id": r["image_id"],
                        "error_type": r["error"].split(":", 1)[0], "message": r["error"],
                        "stage": "score"}
                       for r in table.filter(failed).select(["source_uri", "image_id", "error"])
                       .to_pylist()]
        preds = table.filter(pc.invert(failed)).drop_columns(["error"])
    n = preds.num_rows
    preds = preds.append_column("model", pa.array([meta["model"]] * n, pa.string()))
    preds = preds.append_column("model_version", pa.array([meta["model_version"]] * n, pa.int32()))
    preds = preds.append_column("run_id", pa.array([meta["run_id"]] * n, pa.string()))
    preds = preds.append_column("scored_at", pa.array([now_utc()] * n,
                                                      pa.timestamp("us", tz="UTC")))
    if failed_rows:
        lake.write_parquet(f"{base}/errors/{date_dir}{stem}.parquet", error_table(failed_rows))
    elif stale_errors and stem in stale_errors:
        # an earlier attempt failed rows this one scored: its errors file must not survive
        lake.delete(f"{base}/errors/{date_dir}{stem}.parquet")
    lake.write_parquet(f"{base}/predictions/{date_dir}{stem}.parquet", preds)


def run(spec: Any, lake: Any, ctx: Any) -> dict[str, Any]:  # transitional: typed spec below
    return _run_dict(spec.model_dump(), lake, ctx.job_id)
