"""Job history in the lake (``jobs/<job_id>.json``), so it survives a cluster restart."""

from __future__ import annotations

import getpass
import os
from typing import Any

from medray.cluster.lake import Lake
from medray.workers.shards import now_utc


def record(lake: Lake, job_id: str, kind: str, spec: dict[str, Any], status: str,
           result: dict[str, Any]) -> None:
    previous = lake.read_json_or_none(f"jobs/{job_id}.json") or {}
    lake.write_json(f"jobs/{job_id}.json", {
        "job_id": job_id, "kind": kind, "spec": spec, "status": status, "result": result,
        "submitted_by": os.environ.get("MEDRAY_SUBMITTED_BY") or getpass.getuser(),
        "started_at": previous.get("started_at") or os.environ.get("MEDRAY_SUBMITTED_AT"),
        "ended_at": now_utc().isoformat(),
    })


def list_history(lake: Lake, kind: str | None = None, status: str | None = None
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
