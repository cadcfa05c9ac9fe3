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


def list_history(
    lake: Lake, kind: str | None = None, status: str | None = None
) -> list[dict[str, Any]]:
    rows = []
    for rel in lake.list_files("jobs"):
        if not rel.endswith(".json"):
            continue
        doc = lake.read_json(rel)
        if (kind and doc.get("kind") != kind) or (status and doc.get("status") != status):
            continue
        rows.append(doc)
    return sorted(rows, key=lambda d: d.get("ended_at") or "")
