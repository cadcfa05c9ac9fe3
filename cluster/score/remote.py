"""What Ray runs in other processes for a score job: the shard readers and the scorer actors.

Both are plain classes; ``job.py`` hands them to Ray Data as actor pools with their CPUs and
GPUs, so a unit test can build them directly. Each configures medray's logging in ``__init__``,
because an actor is a fresh process whose lines must carry the job id too.

Both pools start at once (Ray Data's own wait for a pool's actors would start the scorers only
once a reader is up: 1.4 s more of every job's start-up, BENCHMARKS.md); the readers then hold
their first rows back until every scorer actor of the attempt has recorded its start, so a run
is spread over every actor it asked for, not finished by the first one ready.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.infra import costs, faults, logs
from medray.cluster.store import layout, registry
from medray.cluster.store.lake import Lake
from medray.workers.errors import InfraError
from medray.workers.models import ModelCard, import_tensorflow
from medray.workers.scorer import INPUT_COLUMNS, Scorer
from medray.workers.shards import now_utc

log = logging.getLogger(__name__)
_POOL_POLL_S = 0.2  # how often a reader looks for the scorers' start records


def rows_wanted(keys: pa.Table, split: str | None, skip: pa.Array | None,
                only: pa.Array | None) -> pa.Array:
    """One boolean per row of ``keys`` (image_id, split): does the run score it? The one
    rule, shared by the reader and by the resume's check of an earlier attempt's files."""
    mask = pa.array([True] * keys.num_rows)
    if split:
        mask = pc.and_(mask, pc.equal(keys.column("split"), split))
    if skip is not None and len(skip):
        mask = pc.and_(mask, pc.invert(pc.is_in(keys.column("image_id"), value_set=skip)))
    if only is not None:
        mask = pc.and_(mask, pc.is_in(keys.column("image_id"), value_set=only))
    mask = pc.fill_null(mask, False)
    return mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask


def _process_started_at() -> float | None:
    """When the OS started this process, in epoch seconds (None off Linux)."""
    try:
        # field 22 of /proc/self/stat (clock ticks after boot); the name in () may hold spaces
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return round(time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK"), 3)


@dataclass(frozen=True)
class PoolStart:
    """What a reader waits for before its first rows: ``actors`` scorer actors of attempt
    ``job_id`` recorded in run ``run_id``, within ``timeout_s``."""

    run_id: str
    job_id: str
    actors: int
    timeout_s: float


def scorers_started(lake: Lake, start: PoolStart, known: dict[str, bool]) -> int:
    """How many scorer actors of the attempt have recorded their start in the run's actors/
    folder; ``known`` remembers each record already read (file -> this attempt's or not)."""
    for path in lake.list_files(layout.run_actors_dir(start.run_id)):
        name = path.rsplit("/", 1)[-1]
        if path in known or not name.endswith(".json") or name.startswith("."):
            continue  # a dot file is a record still being written
        known[path] = lake.read_json(path).get("job_id") == start.job_id
    return sum(known.values())


def wait_for_scorers(lake: Lake, start: PoolStart, poll_s: float = _POOL_POLL_S) -> None:
    """Return once every scorer actor of the attempt is up; InfraError after the timeout."""
    known: dict[str, bool] = {}
    deadline = time.monotonic() + start.timeout_s
    while (up := scorers_started(lake, start, known)) < start.actors:
        if time.monotonic() > deadline:
            raise InfraError(f"only {up} of {start.actors} scorer actor(s) started in "
                             f"{start.timeout_s:.0f}s: the cluster cannot give them their CPUs "
                             "or GPUs; lower --actors or add nodes")
        time.sleep(poll_s)


class ShardReader:
    """Reads one shard (an item) and yields the rows to score, tagged with their shard.

    Only the id and split columns are read to decide which rows are wanted; pixels are read
    for wanted rows only, so an --only-new run over a grown dataset reads old shards' ids,
    not their pixels. Each block carries ``_shard`` (the shard's stem) and ``_shard_rows`` (how
    many rows the shard yields in all), so the driver knows when a shard is complete.
    """

    def __init__(self, lake_uri: str, split: str | None, skip: pa.Array | None,
                 only: pa.Array | None, rows_per_block: int,
                 pool: PoolStart | None = None) -> None:
        logs.configure()
        self.lake = Lake(lake_uri)
        self.split, self.skip, self.only = split, skip, only
        self.rows_per_block = rows_per_block
        self.pool = pool  # None: no scorer pool to wait for (a unit test)

    def wanted(self, keys: pa.Table) -> pa.Array:
        """One boolean per row of ``keys`` (image_id, split): score it or not."""
        return rows_wanted(keys, self.split, self.skip, self.only)

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        for item in batch["path"]:
            path = str(item)
            stem = layout.shard_stem(path)
            mask = self.wanted(self.lake.read_parquet(path, columns=["image_id", "split"]))
            total = pc.sum(mask).as_py() or 0
            log.debug("shard %s: %d of %d rows to score", stem, total, len(mask))
            if not total:
                continue  # the driver writes an empty file for a shard that yields nothing
            table = self.lake.read_parquet(path, columns=INPUT_COLUMNS)
            if total < table.num_rows:
                table = table.filter(mask)
            if self.pool is not None:  # the shard is read while the scorers start
                wait_for_scorers(self.lake, self.pool)
                self.pool = None
            for start in range(0, total, self.rows_per_block):
                part = table.slice(start, self.rows_per_block)
                part = part.append_column("_shard", pa.array([stem] * part.num_rows))
                part = part.append_column("_shard_rows",
                                          pa.array([total] * part.num_rows, pa.int64()))
                yield part


class ScorerActor:
    """The pure Scorer, with its model fetched from the lake once per actor.

    On start it records where it runs (node, GPUs, precision) in the run's ``actors/`` folder;
    the commit marker lists these records, with ``job_id`` telling which attempt they belong to.
    """

    def __init__(self, lake_uri: str, card: dict[str, Any], run_id: str, job_id: str,
                 mixed_precision: bool, threads: int | None) -> None:
        import ray

        init_at = time.time()
        logs.configure()
        # timed apart: most of an actor's start (bench/bench_startup.py)
        tf_import_s = import_tensorflow()
        t_import = time.perf_counter()
        lake = Lake(lake_uri).tagged(job_id)  # a killed attempt's temporaries carry its id
        # a private copy: the shared per-name cache of registry.fetch is keyed by name and
        # version only, so two lakes (or two actors writing it at once) could mix files up
        cache = tempfile.mkdtemp(prefix="medray-scorer-")
        try:
            path = registry.fetch(lake, ModelCard.from_dict(card), cache_dir=cache)
            self.scorer = Scorer(path, card, mixed_precision=mixed_precision, threads=threads)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        self.delay_s = faults.score_batch_delay()
        self.first_call = True
        # seconds: importing TensorFlow, fetching and loading the model (bench/bench_startup.py)
        # and when the process and __init__ began (epoch s), which split Ray's share from Python's
        startup = {"tensorflow_import_s": round(tf_import_s, 2),
                   "model_load_s": round(time.perf_counter() - t_import, 2),
                   "process_started_at": _process_started_at(), "init_started_at": init_at}
        ctx = ray.get_runtime_context()
        info: dict[str, Any] = {
            "actor_id": ctx.get_actor_id(), "node_id": ctx.get_node_id(), "pid": os.getpid(),
            # the autoscaler's node type (gpu_spot, ...); None on a node started by hand
            "node_type": costs.labelled_type(ctx.get_node_labels()),
            "ray_gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "tensorflow_gpus": self.scorer.gpus, "precision": self.scorer.precision,
            "started_at": now_utc().isoformat(), "job_id": job_id, "startup": startup,
        }
        lake.write_json(layout.run_actor(run_id, info["actor_id"] or str(os.getpid())), info)
        log.info("scorer actor %s on node %s: Ray GPUs %s, TensorFlow GPUs %s, %s",
                 info["actor_id"], info["node_id"], info["ray_gpu_ids"], info["tensorflow_gpus"],
                 info["precision"])

    def __call__(self, table: pa.Table) -> pa.Table:
        t0 = time.perf_counter()
        scored = self.scorer(table)
        if self.first_call:  # the first call traces the model's function
            self.first_call = False
            log.info("scorer first batch of %d rows in %.2fs (tracing included)",
                     table.num_rows, time.perf_counter() - t0)
        if self.delay_s:  # fault tests only (MEDRAY_FAULT=score_batch_delay:S)
            time.sleep(self.delay_s)
        return scored
