"""Job history in the lake (``jobs/<job_id>.json``), so it survives a cluster restart."""

from __future__ import annotations

import getpass
import os
from typing import Any

from medray.cluster.lake import Lake
from medray.workers.shards import now_utc


def record(
    lake: Lake, job_id: str, kind: str, spec: dict[str, Any], status: str, result: dict[str, Any]
) -> None:
    """Write the job's record: RUNNING at start, then SUCCEEDED/FAILED with its result."""
    previous = lake.read_json_or_none(f"jobs/{job_id}.json") or {}
    now = now_utc().isoformat()
    lake.write_json(
        f"jobs/{job_id}.json",
        {
            **previous,
            "job_id": job_id,
            "kind": kind,
            "spec": spec,
            "status": status,
            "result": result,
            "submitted_by": os.environ.get("MEDRAY_SUBMITTED_BY") or getpass.getuser(),
            "submitted_at": os.environ.get("MEDRAY_SUBMITTED_AT"),
            "started_at": previous.get("started_at") or now,
            "ended_at": None if status == "RUNNING" else now,
            "run_id": result.get("run_id") or previous.get("run_id"),
            "dataset": result.get("dataset") or spec.get("dataset"),
            "dataset_version": result.get("dataset_version") or result.get("version")
            if kind == "stage"
            else result.get("dataset_version"),
            "model": result.get("model") or spec.get("model"),
            "model_version": result.get("model_version")
            or (result.get("version") if kind == "train" else None),
        },
    )


def attach_log_tail(lake: Lake, job_id: str, status: str, logs: str, lines: int = 40) -> None:
    """Keep the end of the job's log with its record (the Ray head forgets it on restart)."""
    doc = lake.read_json_or_none(f"jobs/{job_id}.json")
    if doc is None:
        return
    doc["log_tail"] = logs.splitlines()[-lines:]
    if doc.get("status") == "RUNNING":  # the driver died before it could say how it ended
        doc["status"] = status
        doc["ended_at"] = now_utc().isoformat()
    lake.write_json(f"jobs/{job_id}.json", doc)


def _matches(doc: dict[str, Any], filters: dict[str, Any]) -> bool:
    """True when a job record passes every filter given (None means no filter).

    ``dataset``/``model`` accept NAME or NAME:VERSION; ``since``/``until`` are ISO dates or
    times compared with the job's start (UTC), ``until`` inclusive of its whole day."""
    for key in ("kind", "status", "run_id"):
        if filters.get(key) and doc.get(key) != filters[key]:
            return False
    for key in ("dataset", "model"):
        want = filters.get(key)
        if not want:
            continue
        name, _, version = str(want).partition(":")
        if doc.get(key) != name:
            return False
        if version and str(doc.get(f"{key}_version")) != version:
            return False
    started = str(doc.get("started_at") or doc.get("submitted_at") or "")
    if filters.get("since") and started < str(filters["since"]):
        return False
    until = str(filters.get("until") or "")
    return not until or started[: len(until)] <= until


def list_history(lake: Lake, **filters: Any) -> list[dict[str, Any]]:
    """Job records from the lake, oldest first, filtered as in :func:`_matches`."""
    rows = []
    for rel in lake.list_files("jobs"):
        if not rel.endswith(".json"):
            continue
        doc = lake.read_json(rel)
        if _matches(doc, filters):
            rows.append(doc)
    return sorted(rows, key=lambda d: d.get("started_at") or d.get("ended_at") or "")


def record_run_usage(lake: Lake, run_id: str, job_id: str, result: dict[str, Any]) -> None:
    """Keep a score job's usage and cost beside its run (a resumed run has several jobs)."""
    lake.write_json(
        f"runs/{run_id}/usage/{job_id}.json",
        {"job_id": job_id, "usage": result.get("usage"), "cost": result.get("cost"),
         "images": result.get("images")},
    )


def run_cost(lake: Lake, run_id: str, images: int | None) -> dict[str, Any]:
    """What scoring a run used and cost, summed over every job that worked on it.

    ``cost_per_1000_images`` divides the total by the run's committed images, so a stopped and
    resumed run is charged for both attempts."""
    docs = [lake.read_json(rel) for rel in lake.list_files(f"runs/{run_id}/usage")
            if rel.endswith(".json")]
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
