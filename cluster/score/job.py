"""The score job: dataset shards -> reader actors -> scorer actor pool -> one prediction file per
input shard -> a commit marker listing every file. Resumable and exactly-once per run.

A run in the lake (paths from ``medray.cluster.store.layout``)::

    runs/<run_id>/_LEASE.json                    the one job that may write the run
    runs/<run_id>/run.json                       what the run scores, frozen at its first start
    runs/<run_id>/actors/<actor>.json            node, GPUs and precision of each scorer actor
    runs/<run_id>/usage/<job_id>.json            what each attempt used, however it ended
    runs/<run_id>/errors/[date=D/]<shard>.parquet     images that could not be scored
    runs/<run_id>/predictions/[date=D/]<shard>.parquet   one per input shard, written last
    runs/<run_id>/_COMMITTED.json                the commit point: lists every file
    indexes/scored/<model>/<version>/<dataset>/<run_id>.parquet   image ids the run scored

Exactly once: one attempt at a time holds the run's lease (``store/leases.py``) and checks it
before every write; a shard's prediction file is written (atomically) only when all its rows
are scored, and a resumed run (same --run-id) keeps the shards whose file passes the check in
``resume.py`` and scores the rest. Everything a resume could see differently (dataset and
model version, the --only-new baseline, the date partition) is frozen in run.json at the first
start. This module takes the lease, starts or resumes the run and drives the pipeline;
``remote.py`` holds what runs in the actors, ``commit.py`` writes the files and ``usage.py``
records what the attempt used.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.infra import autoscale, events, jobs_client
from medray.cluster.infra.context import JobContext
from medray.cluster.score import resume, sizing
from medray.cluster.score.commit import RunFiles, commit, write_shard, written
from medray.cluster.score.precheck import check_resume, check_sizes, no_gpu_message
from medray.cluster.score.remote import PoolStart, ScorerActor, ShardReader
from medray.cluster.score.usage import EVERY_S as USAGE_EVERY_S
from medray.cluster.score.usage import UsageRecorder
from medray.cluster.store import catalog, layout, leases, registry, runs
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError
from medray.workers.models import ModelCard
from medray.workers.shards import now_utc
from medray.workers.specs import ScoreSpec

log = logging.getLogger(__name__)
# Reading a shard is mostly I/O and decompression: the reader takes no CPU slot, so scorer
# actors may ask for every CPU of a node (e.g. --cpus-per-actor 2 on a 2-core laptop)
_READER_CPUS = 0.0
_PROGRESS_EVERY_S = 5.0
# The scorer pool is fully started before the first batch is handed out: a run is then spread
# over every actor it asked for (a small run used to finish on the first actor ready while the
# others were still importing TensorFlow), and an actor that cannot start (its model does not
# load) fails the run at once with its own error. The readers hold their rows back until then
# (``remote.PoolStart``) rather than Ray Data's own wait, which would start the pools one after
# the other. Bounded, so a cluster that never frees the CPUs gives a clear failure instead of a
# job that waits forever.
ACTOR_START_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Attempt:
    """One attempt at a run, fixed before its pipeline starts: what it scores, with what, and
    where the files go."""

    spec: ScoreSpec
    job_id: str
    card: ModelCard
    files: RunFiles
    gpus: float  # per scorer actor; 0 scores on CPUs
    pending: tuple[str, ...]  # dataset shard paths with no prediction file yet
    skip: pa.Array | None  # --only-new: the ids the baseline's committed runs scored
    only: pa.Array | None  # --retry-failed: the ids that failed in that run
    stale_errors: frozenset[str]  # stems with an errors file from an earlier attempt
    lease: leases.Lease  # checked before every file this attempt writes
    # actors, CPUs, threads and batch: given, or chosen for the cluster; None: the spec's own
    sizing: sizing.Sizing | None = None


def run(spec: ScoreSpec, lake: Lake, ctx: JobContext) -> dict[str, Any]:
    """Take the run's lease, then start or resume the run, score the shards without a sound
    prediction file and commit the run. The lease is renewed (and this attempt's usage
    recorded) from a daemon thread until the job ends, however it ends."""
    started = time.monotonic()
    lake = lake.tagged(ctx.job_id)  # this attempt's local temporaries carry its job id
    check_resume(lake, spec)  # a committed run id is refused before anything is written
    run_id = spec.run_id or _new_run_id(lake, spec)
    lease = leases.acquire(lake, run_id, ctx.job_id, jobs_client.job_state_in_cluster,
                           by="job")
    log.info("run %s: lease taken by job %s%s", run_id, ctx.job_id,
             "".join(f" (replacing job {r['owner']}: {r['why']})"
                     for r in lease.doc["replaced"][-1:]))
    try:  # checked again under the lease: the run may have been committed meanwhile
        doc, resumed = start_run(lake, spec, ctx, run_id)
    except BaseException:
        lease.release()  # refused before any work: this attempt leaves nothing behind
        raise
    usage = UsageRecorder(lake, run_id, ctx.job_id, started)
    try:
        with leases.Keeper(lease, chores=((USAGE_EVERY_S, usage.running),)):
            return _run_leased(spec, lake, ctx, lease, doc, resumed, started)
    except BaseException as exc:
        usage.ended(exc)
        raise


def _run_leased(spec: ScoreSpec, lake: Lake, ctx: JobContext, lease: leases.Lease,
                doc: dict[str, Any], resumed: bool, started: float) -> dict[str, Any]:
    run_id = doc["run_id"]
    if resumed:
        log.info("resuming run %s (started %s)", run_id, doc["started_at"])
    # the versions come from run.json: a resume scores what the first start resolved
    dataset, dversion, manifest = catalog.resolve(lake, f"{doc['dataset']}:"
                                                        f"{doc['dataset_version']}")
    card = registry.resolve(lake, f"{doc['model']}:{doc['model_version']}")
    assert card.version is not None  # a resolved card is a registered version
    check_sizes(card, manifest, dataset, dversion)
    gpus = _gpus_for_actors(spec)
    size = _size(spec, gpus, card)
    _check_cpus(size)

    date_dir = layout.date_partition(doc["partition_date"]) if doc["partition_by"] == "date" \
        else ""
    files = RunFiles(run_id=run_id, model=card.name, model_version=card.version,
                     labels=tuple(card.labels), date_dir=date_dir)
    stems = {layout.shard_stem(s["path"]): s["path"] for s in manifest["shards"]}
    skip = runs.scored_ids(lake, card.name, card.version, dataset, doc["only_new_runs"]) \
        if doc["only_new"] else None
    only = _failed_ids(lake, doc["retry_failed"]) if doc.get("retry_failed") else None
    done = written(lake, layout.run_predictions_dir(run_id))
    error_files = written(lake, layout.run_errors_dir(run_id))
    # an earlier attempt's file is kept only if it holds exactly the rows it should
    rejected = resume.unsound(lake, stems, done, error_files,
                              resume.RowChoice(doc["split"], skip, only)) if done else set()
    pending = tuple(path for stem, path in stems.items()
                    if stem not in done or stem in rejected)
    log.info("run %s: %s:%d with %s:%d, %d shards, %d already written, %d to score%s%s%s",
             run_id, dataset, dversion, card.name, card.version, len(stems),
             len(stems) - len(pending), len(pending),
             f" ({len(rejected)} rejected on checking)" if rejected else "",
             f", skipping {len(skip)} images scored by earlier runs" if skip is not None else "",
             f", retrying {len(only)} failed images of {doc['retry_failed']}"
             if only is not None else "")
    if pending:
        _score_shards(lake, Attempt(spec=spec, job_id=ctx.job_id, card=card, files=files,
                                    gpus=gpus, pending=pending, skip=skip, only=only,
                                    stale_errors=frozenset(error_files), lease=lease,
                                    sizing=size))
    marker = commit(lake, doc, files, stems, lease, gpus, started)
    already = len(stems) - len(pending)
    log.info("committed run %s: %d images scored, %d errors, %d files (%d from earlier "
             "attempts), %.1fs", run_id, marker["images"], marker["errors"],
             len(marker["files"]), already, marker["seconds"])
    return {"job_id": ctx.job_id, "run_id": run_id,
            "predictions_uri": lake.full_uri(layout.run_predictions_dir(run_id)),
            "errors_uri": lake.full_uri(layout.run_errors_dir(run_id)),
            # what to read: the marker lists the committed files (the folders may hold others)
            "commit_uri": lake.full_uri(layout.run_commit(run_id)),
            "images": marker["images"], "errors": marker["errors"], "model": card.name,
            "model_version": card.version, "dataset": doc["dataset"],
            "dataset_version": doc["dataset_version"], "shards": len(marker["files"]),
            "resumed_shards": already, "device": "gpu" if gpus else "cpu",
            "sizing": size.as_dict(), "seconds": marker["seconds"]}


# ------------------------------------------------------------------ starting or resuming a run
def _new_run_id(lake: Lake, spec: ScoreSpec) -> str:
    card = registry.resolve(lake, spec.model)
    assert card.version is not None  # a resolved card is a registered version
    return runs.new_run_id(card.name, card.version)


def start_run(lake: Lake, spec: ScoreSpec, ctx: JobContext,
              run_id: str) -> tuple[dict[str, Any], bool]:
    """The run's run.json (new, or the one frozen at its first start, with this attempt added)
    and whether this is a resume. Called holding the run's lease."""
    existing = check_resume(lake, spec)
    if existing:
        attempts = [*existing.get("attempts", []), {"job_id": ctx.job_id,
                                                    "started_at": now_utc().isoformat()}]
        doc = {**existing, "attempts": attempts}
        lake.write_json(layout.run_doc(doc["run_id"]), doc)
        return doc, True
    dataset, dversion, _ = catalog.resolve(lake, spec.dataset)
    card = registry.resolve(lake, spec.model)
    assert card.version is not None  # a resolved card is a registered version
    started = now_utc()
    doc = {"run_id": run_id, "job_id": ctx.job_id, "dataset": dataset,
           "dataset_version": dversion, "model": card.name, "model_version": card.version,
           "model_ref": spec.model, "split": spec.split, "only_new": spec.only_new,
           "retry_failed": spec.retry_failed, "partition_by": spec.partition_by,
           "partition_date": started.date().isoformat(), "labels": card.labels,
           "multi_label": card.multi_label, "thresholds": card.thresholds,
           "started_at": started.isoformat(),
           # the --only-new baseline: the runs committed now, so a resume skips the same images
           "only_new_runs": runs.indexed_runs(lake, card.name, card.version, dataset)
           if spec.only_new else [],
           "attempts": [{"job_id": ctx.job_id, "started_at": started.isoformat()}]}
    lake.write_json(layout.run_doc(run_id), doc)
    if spec.only_new:
        _warn_concurrent_only_new(lake, doc, ctx.job_id)
    return doc, False


def _warn_concurrent_only_new(lake: Lake, doc: dict[str, Any], job_id: str) -> None:
    """Two uncommitted --only-new runs cannot see each other's images: say so.

    This warns rather than refuses: a run that was killed and never resumed would otherwise
    block every later one (a run's lease guards one run id, not a model and dataset).
    """
    model, version, dataset = doc["model"], doc["model_version"], doc["dataset"]
    others = [f.rsplit("/", 1)[-1].removesuffix(".json")
              for f in lake.list_files(layout.scored_inflight(model, version, dataset))
              if f.endswith(".json")]
    for other in others:
        if other != doc["run_id"] and not runs.is_committed(lake, other):
            log.warning("run %s (--only-new, same model version and dataset) is not "
                        "committed: images new to both runs are scored by both. Resume or "
                        "finish %s before the next --only-new run", other, other)
    lake.write_json(layout.scored_inflight_run(model, version, dataset, doc["run_id"]),
                    {"job_id": job_id, "started_at": doc["started_at"]})


def _failed_ids(lake: Lake, run_id: str) -> pa.Array:
    """The distinct image ids a committed run could not score (--retry-failed)."""
    failed = runs.read_errors(lake, run_id).column("image_id")
    return pc.unique(pc.drop_null(failed).combine_chunks())


def _gpus_for_actors(spec: ScoreSpec) -> float:
    """GPUs per scorer actor: the spec's, or 0 with --allow-cpu on a cluster without them."""
    import ray

    gpus = spec.gpus_per_actor
    have = autoscale.reachable_resources(ray.cluster_resources()).get("GPU", 0.0)
    if gpus and have < gpus:
        if not spec.allow_cpu:
            raise ConfigError(no_gpu_message(gpus, have))
        log.warning("--gpus-per-actor %g but the cluster has %g GPU(s): scoring on CPUs "
                    "(--allow-cpu)", gpus, have)
        return 0.0
    return gpus


def _size(spec: ScoreSpec, gpus: float, card: ModelCard) -> sizing.Sizing:
    """The pool's size: the flags given, the rest chosen for this cluster (``sizing.py``)."""
    import ray

    reachable = autoscale.reachable_resources(ray.cluster_resources())
    size = sizing.choose(spec, gpus, sizing.free_nodes(), reachable.get("GPU", 0.0),
                         card.input_size * card.input_size * card.channels)
    log.info("scorer pool: %d actor(s) x %g CPU(s)%s, %s threads, batch %d%s", size.actors,
             size.cpus_per_actor, f" x {gpus:g} GPU(s)" if gpus else "",
             size.threads or "TensorFlow's", size.batch_size,
             f" (chosen for this cluster: {', '.join(size.chosen)})" if size.chosen else "")
    return size


def _check_cpus(size: sizing.Sizing) -> None:
    import ray

    # an autoscaling cluster counts the CPUs it can add: its workers start at zero
    cpus = autoscale.reachable_resources(ray.cluster_resources()).get("CPU", 0.0)
    asked = size.actors * size.cpus_per_actor + _READER_CPUS
    if asked > cpus:  # Ray Data would wait for the missing actors forever
        raise ConfigError(f"{size.actors} actor(s) x {size.cpus_per_actor:g} CPU(s) need "
                          f"{asked:g} CPUs but the cluster has {cpus:g}: lower --actors or "
                          "--cpus-per-actor")


# ------------------------------------------------------------------ the Ray Data pipeline
def _score_shards(lake: Lake, attempt: Attempt) -> None:
    """Stream the pending shards through the readers and the scorer pool into shard files."""
    import ray

    spec, pending = attempt.spec, attempt.pending
    size = attempt.sizing or sizing.Sizing.given(spec, attempt.gpus)
    # both pools start at once: each pool's own wait would start the scorers after a reader
    ray.data.DataContext.get_current().wait_for_min_actors_s = -1
    start = PoolStart(run_id=attempt.files.run_id, job_id=attempt.job_id, actors=size.actors,
                      timeout_s=ACTOR_START_TIMEOUT_S)
    ds = ray.data.from_items([{"path": p} for p in pending], override_num_blocks=len(pending))
    rows = ds.map_batches(
        ShardReader,
        # one block per scorer batch, so the batches of even one shard spread over the pool
        fn_constructor_args=(lake.uri, spec.split, attempt.skip, attempt.only, size.batch_size,
                             start),
        batch_size=1,
        batch_format="numpy",
        **_reader_pool(size.actors, len(pending)),
    )
    scored = rows.map_batches(
        ScorerActor,
        fn_constructor_args=(lake.uri, asdict(attempt.card), attempt.files.run_id,
                             attempt.job_id, spec.mixed_precision, size.threads),
        batch_size=size.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=size.actors),
        num_cpus=size.cpus_per_actor,
        num_gpus=attempt.gpus or None,
    )
    _write_as_completed(lake, attempt,
                        scored.iter_batches(batch_format="pyarrow", batch_size=None))


def _reader_pool(scorers: int, shards: int) -> dict[str, Any]:
    """The shard readers' pool: up to 2 readers (0 CPUs), started as they are needed for one
    scorer; for several scorers (one per node on CPUs) both from the start and on different
    nodes. Ray Data hands a block to a scorer on the node that holds it first, so readers on
    one node alone kept that node's scorer busy and left the others waiting (BENCHMARKS.md,
    "Scoring with default flags on 2 nodes with cores of their own")."""
    import ray

    readers = min(2, shards)
    if scorers == 1:
        return {"compute": ray.data.ActorPoolStrategy(min_size=1, max_size=readers),
                "num_cpus": _READER_CPUS}
    return {"compute": ray.data.ActorPoolStrategy(size=readers), "num_cpus": _READER_CPUS,
            "scheduling_strategy": "SPREAD"}


def _write_as_completed(lake: Lake, attempt: Attempt, batches: Iterable[pa.Table]) -> None:
    """Write each shard's file as soon as all its rows are scored, in whatever order they come.

    Only prediction rows (no pixels) wait here, and only for shards still in flight.
    """
    buffers: dict[str, list[pa.Table]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    written_shards = images = errors = 0
    t0 = last_log = time.monotonic()
    bar = events.Phase("scoring", "shards", len(attempt.pending))
    for batch in batches:
        for stem in pc.unique(batch.column("_shard")).to_pylist():
            part = batch.filter(pc.equal(batch.column("_shard"), stem))
            buffers[stem].append(part)
            counts[stem] += part.num_rows
            expected = part.column("_shard_rows")[0].as_py()
            if counts[stem] == expected:
                write_shard(lake, attempt.files, stem, pa.concat_tables(buffers.pop(stem)),
                            attempt.stale_errors, attempt.lease)
                written_shards += 1
            elif counts[stem] > expected:
                raise RuntimeError(f"shard {stem}: {counts[stem]} rows for {expected} inputs")
        images += batch.num_rows
        errors += batch.num_rows - batch.column("error").null_count
        bar.update(written_shards, images=images, errors=errors,
                   images_per_s=images / max(1e-9, time.monotonic() - t0))
        if time.monotonic() - last_log > _PROGRESS_EVERY_S:
            log.info("progress: %d images scored, %d/%d shards written, %.0f img/s", images,
                     written_shards, len(attempt.pending), images / (time.monotonic() - t0))
            last_log = time.monotonic()
    if buffers:
        raise RuntimeError(f"incomplete shards after scoring: {sorted(buffers)}")
    # shards with no rows to score (split, --only-new or --retry-failed left none) get a file
    for path in attempt.pending:
        stem = layout.shard_stem(path)
        if stem not in counts:
            write_shard(lake, attempt.files, stem, None, attempt.stale_errors, attempt.lease)
    bar.finish(len(attempt.pending), images=images, errors=errors,
               images_per_s=images / max(1e-9, time.monotonic() - t0))
    log.info("scored %d images in %d shards, %.0f img/s after start-up", images,
             len(attempt.pending), images / max(1e-9, time.monotonic() - t0))
