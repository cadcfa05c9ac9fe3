"""The score job: dataset shards -> reader tasks -> scorer actor pool -> one prediction file per
input shard -> a commit marker listing every file. Resumable and exactly-once per run."""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster import catalog, registry
from medray.cluster.lake import Lake
from medray.workers.errors import ConfigError, InputError, NotFoundError
from medray.workers.models import ModelCard
from medray.workers.scorer import INPUT_COLUMNS, Scorer, prediction_schema
from medray.workers.shards import error_table, now_utc

log = logging.getLogger(__name__)
COMMIT = "_COMMITTED.json"


def shard_stem(path: str) -> str:
    """'datasets/cxr/1/shards/part-00003.parquet' -> 'cxr.1.part-00003' (unique per dataset)."""
    parts = path.split("/")
    return f"{parts[1]}.{parts[2]}.{parts[-1].removesuffix('.parquet')}"


def new_run_id(model: str, version: int) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{model}-v{version}-{stamp}-{uuid.uuid4().hex[:6]}"


def is_committed(lake: Lake, run_id: str) -> bool:
    return lake.exists(f"runs/{run_id}/{COMMIT}")


def read_commit(lake: Lake, run_id: str) -> dict[str, Any]:
    marker = lake.read_json_or_none(f"runs/{run_id}/{COMMIT}")
    if marker is None:
        raise NotFoundError(f"run {run_id!r} is not committed (or does not exist) in {lake.uri}")
    return dict(marker)


def read_predictions(lake: Lake, run_id: str, columns: list[str] | None = None) -> pa.Table:
    """All prediction rows of a committed run, only from the files its marker lists."""
    marker = read_commit(lake, run_id)
    tables = [lake.read_parquet(f"runs/{run_id}/{f}", columns=columns) for f in marker["files"]]
    if not tables:
        return prediction_schema(marker["labels"]).empty_table()
    return pa.concat_tables(tables, promote_options="default")


def read_errors(lake: Lake, run_id: str) -> pa.Table:
    marker = read_commit(lake, run_id)
    tables = [lake.read_parquet(f"runs/{run_id}/{f}") for f in marker["error_files"]]
    return pa.concat_tables(tables) if tables else error_table([])


def _index_dir(model: str, version: int, dataset: str) -> str:
    return f"indexes/scored/{model}/{version}/{dataset}"


def scored_ids(lake: Lake, model: str, version: int, dataset: str) -> set[str]:
    """Image ids with a committed prediction for this model version (one small file per run)."""
    ids: set[str] = set()
    for rel in lake.list_files(_index_dir(model, version, dataset)):
        ids.update(lake.read_parquet(rel, columns=["image_id"]).column(0).to_pylist())
    return ids


class ShardReader:
    """Reads one shard (an item) and yields the rows to score, tagged with their shard."""

    def __init__(self, lake_uri: str, split: str | None, skip: set[str] | None,
                 only: set[str] | None, rows_per_batch: int = 1024) -> None:
        self.lake = Lake(lake_uri)
        self.split, self.skip, self.only = split, skip, only
        self.rows_per_batch = rows_per_batch

    def _keep(self, table: pa.Table) -> pa.Table:
        if self.split:
            table = table.filter(pc.equal(table.column("split"), self.split))
        if self.skip:
            table = table.filter(pc.invert(pc.is_in(table.column("image_id"),
                                                    pa.array(list(self.skip)))))
        if self.only is not None:
            table = table.filter(pc.is_in(table.column("image_id"), pa.array(list(self.only))))
        return table

    def __call__(self, batch: dict[str, Any]) -> Iterator[pa.Table]:
        for path in batch["path"]:
            table = self._keep(self.lake.read_parquet(str(path),
                                                      columns=[*INPUT_COLUMNS, "split"]))
            table = table.drop_columns(["split"])
            stem = shard_stem(str(path))
            total = table.num_rows
            for start in range(0, total, self.rows_per_batch):
                part = table.slice(start, self.rows_per_batch)
                part = part.append_column("_shard", pa.array([stem] * part.num_rows))
                part = part.append_column("_shard_rows", pa.array([total] * part.num_rows,
                                                                  pa.int64()))
                yield part


class ScorerActor:
    """The pure Scorer, with its model fetched from the lake once per actor."""

    def __init__(self, lake_uri: str, card: dict[str, Any], mixed_precision: bool) -> None:
        model_card = ModelCard.from_dict(card)
        path = registry.fetch(Lake(lake_uri), model_card)
        self.scorer = Scorer(path, card, mixed_precision=mixed_precision)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.scorer(table)


def _check_run(lake: Lake, run_id: str, run_doc: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse a committed or foreign run id; returns the existing run doc when resuming."""
    if is_committed(lake, run_id):
        raise InputError(f"run {run_id!r} is already committed; pick a new --run-id "
                         "(or leave it out) to score again")
    existing = lake.read_json_or_none(f"runs/{run_id}/run.json")
    if existing:
        for key in ("dataset", "dataset_version", "model", "model_version", "split", "only_new"):
            if existing.get(key) != run_doc.get(key):
                raise InputError(f"run {run_id!r} exists for {key}={existing.get(key)!r}, not "
                                 f"{run_doc.get(key)!r}: resume with the same options or use "
                                 "another --run-id")
    return existing


def run(spec: dict[str, Any], lake: Lake, job_id: str) -> dict[str, Any]:
    import ray

    started = time.monotonic()
    dataset, dversion, manifest = catalog.resolve(lake, spec["dataset"])
    card = registry.resolve(lake, spec["model"])
    assert card.version is not None
    if (manifest["image_size"], manifest["channels"]) != (card.input_size, card.channels):
        raise ConfigError(
            f"model {card.name}:{card.version} takes {card.input_size}px x{card.channels} but "
            f"dataset {dataset}:{dversion} holds {manifest['image_size']}px "
            f"x{manifest['channels']}: stage the images at the model's size"
        )
    gpus = float(spec["gpus_per_actor"])
    if gpus and ray.cluster_resources().get("GPU", 0) < gpus:
        if not spec["allow_cpu"]:
            raise ConfigError(f"--gpus-per-actor {gpus:g} but the cluster has no GPU; pass "
                              "--allow-cpu to score on CPUs")
        log.warning("[%s] no GPU in the cluster: scoring on CPU (--allow-cpu)", job_id)
        gpus = 0.0
    run_id = spec.get("run_id") or new_run_id(card.name, card.version)
    run_doc = {"run_id": run_id, "job_id": job_id, "dataset": dataset, "dataset_version": dversion,
               "model": card.name, "model_version": card.version, "split": spec.get("split"),
               "only_new": bool(spec.get("only_new")), "labels": card.labels,
               "multi_label": card.multi_label, "thresholds": card.thresholds,
               "started_at": now_utc().isoformat(), "retry_failed": spec.get("retry_failed")}
    existing = _check_run(lake, run_id, run_doc)
    if existing is None:
        lake.write_json(f"runs/{run_id}/run.json", run_doc)
    else:
        run_doc = existing
        log.info("[%s] resuming run %s", job_id, run_id)
    base = f"runs/{run_id}"
    date_dir = f"date={datetime.now(UTC).date().isoformat()}/" if spec["partition_by"] == "date" \
        else ""
    done = {f.rsplit("/", 1)[-1].removesuffix(".parquet")
            for f in lake.list_files(f"{base}/predictions", recursive=True)}
    shard_paths = [s["path"] for s in manifest["shards"]]
    pending = [p for p in shard_paths if shard_stem(p) not in done]
    skip = scored_ids(lake, card.name, card.version, dataset) if run_doc["only_new"] else None
    only = None
    if spec.get("retry_failed"):
        failed = read_errors(lake, spec["retry_failed"])
        only = {i for i in failed.column("image_id").to_pylist() if i}
    log.info("[%s] run %s: %d shards, %d already written, %d to score%s", job_id, run_id,
             len(shard_paths), len(shard_paths) - len(pending), len(pending),
             f", skipping {len(skip)} already-scored images" if skip else "")

    if pending:
        _score_shards(spec, lake, job_id, card, pending, skip, only, base, date_dir, run_id,
                      gpus)
    files = sorted(f[len(base) + 1:] for f in lake.list_files(f"{base}/predictions",
                                                               recursive=True))
    error_files = sorted(f[len(base) + 1:] for f in lake.list_files(f"{base}/errors",
                                                                    recursive=True))
    expected = {shard_stem(p) for p in shard_paths}
    got = {f.rsplit("/", 1)[-1].removesuffix(".parquet") for f in files}
    if got != expected:
        raise InputError(f"run {run_id}: prediction files missing for {sorted(expected - got)}")
    images = sum(lake.read_parquet(f"{base}/{f}", columns=["image_id"]).num_rows for f in files)
    n_errors = sum(lake.read_parquet(f"{base}/{f}", columns=["image_id"]).num_rows
                   for f in error_files)
    marker = {**run_doc, "files": files, "error_files": error_files, "images": images,
              "errors": n_errors, "committed_at": now_utc().isoformat(),
              "seconds": round(time.monotonic() - started, 2)}
    lake.write_json(f"{base}/{COMMIT}", marker)  # the commit point
    _write_index(lake, run_id, card, dataset, files, base)
    log.info("[%s] committed run %s: %d images scored, %d errors, %.1fs", job_id, run_id, images,
             n_errors, time.monotonic() - started)
    return {"job_id": job_id, "run_id": run_id, "predictions_uri": lake.full_uri(
        f"{base}/predictions"), "errors_uri": lake.full_uri(f"{base}/errors"), "images": images,
        "errors": n_errors, "model": card.name, "model_version": card.version,
        "dataset": dataset, "dataset_version": dversion}


def _write_index(lake: Lake, run_id: str, card: ModelCard, dataset: str, files: list[str],
                 base: str) -> None:
    assert card.version is not None
    ids = pa.concat_tables(
        [lake.read_parquet(f"{base}/{f}", columns=["image_id"]) for f in files]
    ) if files else pa.table({"image_id": pa.array([], pa.string())})
    lake.write_parquet(f"{_index_dir(card.name, card.version, dataset)}/{run_id}.parquet", ids)


def _score_shards(spec: dict[str, Any], lake: Lake, job_id: str, card: ModelCard,
                  pending: list[str], skip: set[str] | None, only: set[str] | None, base: str,
                  date_dir: str, run_id: str, gpus: float) -> None:
    import ray

    ds = ray.data.from_items([{"path": p} for p in pending], override_num_blocks=len(pending))
    rows = ds.map_batches(ShardReader, fn_constructor_args=(lake.uri, spec.get("split"), skip,
                                                            only),
                          batch_size=1, batch_format="numpy", concurrency=(1, 2), num_cpus=0.25)
    scored = rows.map_batches(
        ScorerActor,
        fn_constructor_args=(lake.uri, card.__dict__, bool(spec["mixed_precision"])),
        batch_size=int(spec["batch_size"]),
        batch_format="pyarrow",
        concurrency=int(spec["actors"]),
        num_cpus=float(spec["cpus_per_actor"]),
        num_gpus=gpus or None,
    )
    meta = {"model": card.name, "model_version": card.version, "run_id": run_id}
    buffers: dict[str, list[pa.Table]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    written = 0
    images = 0
    t0 = time.monotonic()
    last_log = t0
    for batch in scored.iter_batches(batch_format="pyarrow", batch_size=None):
        for stem in pc.unique(batch.column("_shard")).to_pylist():
            part = batch.filter(pc.equal(batch.column("_shard"), stem))
            buffers[stem].append(part)
            counts[stem] += part.num_rows
            expected = part.column("_shard_rows")[0].as_py()
            if counts[stem] == expected:
                _write_shard(lake, base, date_dir, stem, pa.concat_tables(buffers.pop(stem)),
                             meta)
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
    # shards with no rows to score (split or --only-new filtered everything) still get a file
    for path in pending:
        stem = shard_stem(path)
        if not lake.exists(f"{base}/predictions/{date_dir}{stem}.parquet") and stem not in counts:
            _write_shard(lake, base, date_dir, stem, None, meta, labels=card.labels)


def _write_shard(lake: Lake, base: str, date_dir: str, stem: str, table: pa.Table | None,
                 meta: dict[str, Any], labels: list[str] | None = None) -> None:
    """Errors first, predictions last: a predictions file means the shard is complete."""
    if table is None:
        preds = prediction_schema(labels or []).empty_table().drop_columns(["error"])
        failed_rows: list[dict[str, Any]] = []
    else:
        table = table.drop_columns(["_shard", "_shard_rows"])
        failed = pc.invert(pc.is_null(table.column("error")))
        failed_rows = [{"source_uri": r["source_uri"], "image_id": r["image_id"],
                        "error_type": r["error"].split(":", 1)[0], "message": r["error"],
                        "stage": "score"} for r in table.filter(failed).to_pylist()]
        preds = table.filter(pc.invert(failed)).drop_columns(["error"])
    n = preds.num_rows
    preds = preds.append_column("model", pa.array([meta["model"]] * n, pa.string()))
    preds = preds.append_column("model_version", pa.array([meta["model_version"]] * n, pa.int32()))
    preds = preds.append_column("run_id", pa.array([meta["run_id"]] * n, pa.string()))
    preds = preds.append_column("scored_at", pa.array([now_utc()] * n, pa.timestamp("us",
                                                                                    tz="UTC")))
    if failed_rows:
        lake.write_parquet(f"{base}/errors/{date_dir}{stem}.parquet", error_table(failed_rows))
    lake.write_parquet(f"{base}/predictions/{date_dir}{stem}.parquet", preds)
