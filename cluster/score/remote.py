"""What Ray runs in other processes for a score job: the shard readers and the scorer actors.

Both are plain classes; ``job.py`` hands them to Ray Data as actor pools with their CPUs and
GPUs, so a unit test can build them directly. Each configures medray's logging in ``__init__``,
because an actor is a fresh process whose lines must carry the job id too.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.infra import costs, faults, logs
from medray.cluster.store import layout, registry
from medray.cluster.store.lake import Lake
from medray.workers.models import ModelCard
from medray.workers.scorer import INPUT_COLUMNS, Scorer
from medray.workers.shards import now_utc

log = logging.getLogger(__name__)


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


class ShardReader:
    """Reads one shard (an item) and yields the rows to score, tagged with their shard.

    Only the id and split columns are read to decide which rows are wanted; pixels are read
    for wanted rows only, so an --only-new run over a grown dataset reads old shards' ids,
    not their pixels. Each block carries ``_shard`` (the shard's stem) and ``_shard_rows`` (how
    many rows the shard yields in all), so the driver knows when a shard is complete.
    """

    def __init__(self, lake_uri: str, split: str | None, skip: pa.Array | None,
                 only: pa.Array | None, rows_per_block: int) -> None:
        logs.configure()
        self.lake = Lake(lake_uri)
        self.split, self.skip, self.only = split, skip, only
        self.rows_per_block = rows_per_block

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

        logs.configure()
        t0 = time.perf_counter()
        import tensorflow  # noqa: F401 - timed apart: most of an actor's start (bench_startup)

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
        startup = {"tensorflow_import_s": round(t_import - t0, 2),
                   "model_load_s": round(time.perf_counter() - t_import, 2)}
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
