"""Scoring runs in the lake: reading committed runs, the scored-images index, and each job's
usage kept beside its run. Only a run whose commit marker exists is visible; every read goes
through the files the marker lists, never a listing of the run's folder."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.workers.errors import NotFoundError
from medray.workers.scorer import prediction_schema
from medray.workers.shards import error_table


def new_run_id(model: str, version: int) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{model}-v{version}-{stamp}-{uuid.uuid4().hex[:6]}"


def is_committed(lake: Lake, run_id: str) -> bool:
    return lake.exists(layout.run_commit(run_id))


def read_commit(lake: Lake, run_id: str) -> dict[str, Any]:
    marker = lake.read_json_or_none(layout.run_commit(run_id))
    if marker is None:
        raise NotFoundError(f"run {run_id!r} is not committed (or does not exist) in {lake.uri}: "
                            "list runs with `medray jobs list --kind score`")
    return dict(marker)


def read_predictions(lake: Lake, run_id: str, columns: list[str] | None = None) -> pa.Table:
    """All prediction rows of a committed run, only from the files its marker lists."""
    marker = read_commit(lake, run_id)
    tables = [lake.read_parquet(layout.run_file(run_id, f), columns=columns)
              for f in marker["files"]]
    if not tables:
        return prediction_schema(marker["labels"]).empty_table()
    return pa.concat_tables(tables, promote_options="default")


def committed_files(lake: Lake, run_id: str) -> dict[str, list[str]]:
    """The full URIs of a committed run's prediction and error files, from its marker: what
    DuckDB, Spark or pandas should read (a glob of the folder would also read files of
    uncommitted or abandoned attempts)."""
    marker = read_commit(lake, run_id)
    return {key: [lake.full_uri(layout.run_file(run_id, f)) for f in marker[key]]
            for key in ("files", "error_files")}


def read_errors(lake: Lake, run_id: str) -> pa.Table:
    marker = read_commit(lake, run_id)
    tables = [lake.read_parquet(layout.run_file(run_id, f)) for f in marker["error_files"]]
    return pa.concat_tables(tables) if tables else error_table([])


# ------------------------------------------------------------------ the scored-images index
def indexed_runs(lake: Lake, model: str, version: int, dataset: str) -> list[str]:
    """Committed runs with an index file for this model version and dataset (one stat each)."""
    runs = [f.rsplit("/", 1)[-1].removesuffix(".parquet")
            for f in lake.list_files(layout.scored_index_dir(model, version, dataset))
            if f.endswith(".parquet") and not f.rsplit("/", 1)[-1].startswith(".")]
    return [r for r in runs if is_committed(lake, r)]


def scored_ids(lake: Lake, model: str, version: int, dataset: str,
               runs: list[str] | None = None) -> pa.Array:
    """Image ids with a committed prediction for this model version: one small file per run,
    never a read of the runs' predictions."""
    runs = indexed_runs(lake, model, version, dataset) if runs is None else runs
    chunks = [lake.read_parquet(layout.scored_index(model, version, dataset, r),
                                columns=["image_id"]).column(0) for r in runs]
    if not chunks:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array(chunks, pa.string()).combine_chunks())


# ------------------------------------------------------------------ usage and cost per run
def record_usage(lake: Lake, run_id: str, job_id: str, result: dict[str, Any],
                 status: str = "SUCCEEDED") -> None:
    """Keep a score job's usage and cost beside its run (a resumed run has several jobs).

    A job writes it as it runs (``RUNNING``, every half minute) and when it ends, however it
    ends (``SUCCEEDED``, ``FAILED``, ``STOPPED``); a job killed outright leaves its last
    ``RUNNING`` record, so every attempt's cost is counted."""
    lake.write_json(
        layout.run_usage(run_id, job_id),
        {"job_id": job_id, "status": status, "usage": result.get("usage"),
         "cost": result.get("cost"), "images": result.get("images"),
         "recorded_at": datetime.now(UTC).isoformat()},
    )


def run_cost(lake: Lake, run_id: str, images: int | None) -> dict[str, Any]:
    """What scoring a run used and cost, summed over every job that worked on it, whether it
    succeeded, failed, was stopped or was killed.

    ``cost_per_1000_images`` divides the total by the run's committed images."""
    docs = [lake.read_json(rel) for rel in lake.list_files(layout.run_usage_dir(run_id))
            if rel.endswith(".json") and not rel.rsplit("/", 1)[-1].startswith(".")]
    out: dict[str, Any] = {
        "score_jobs": len(docs),
        "cpu_seconds": round(sum((d.get("usage") or {}).get("cpu_seconds", 0.0) for d in docs), 3),
        "gpu_seconds": round(sum((d.get("usage") or {}).get("gpu_seconds", 0.0) for d in docs), 3),
        "cost_total": None, "cost_per_1000_images": None, "currency": None,
    }
    priced = [d["cost"] for d in docs if d.get("cost")]
    if docs and len(priced) == len(docs):  # a partly priced run would under-report
        out["cost_total"] = round(sum(c["total"] for c in priced), 9)
        out["currency"] = priced[0].get("currency")
        if images:
            out["cost_per_1000_images"] = round(out["cost_total"] / images * 1000, 6)
    return out
