"""Job history in the lake (``jobs/<job_id>.json``), so it survives a cluster restart."""

from __future__ import annotations

from typing import Any

from medray.cluster.infra.context import JobContext
from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.workers.shards import now_utc
from medray.workers.specs import JobSpec

# A stage record's source until the stage job has listed it and knows how the lake may name it
SOURCE_NOT_LISTED = "(not yet listed)"


def record(
    lake: Lake, ctx: JobContext, job_spec: JobSpec, status: str, result: dict[str, Any],
    source_label: str | None = None,
) -> None:
    """Write the job's record: RUNNING at start, then SUCCEEDED/FAILED with its result.

    A stage spec's ``source`` is stored as the stage job labels it (``source_label``: a DICOM
    source by its keyed pseudonym, since a DICOM folder is often named after its patient),
    never as given: until the job has listed the source, the record says it is not listed yet.
    """
    job_id, kind = ctx.job_id, ctx.kind
    spec = job_spec.model_dump()
    previous = lake.read_json_or_none(layout.job_record(job_id)) or {}
    if "source" in spec:
        spec["source"] = (source_label or (previous.get("spec") or {}).get("source")
                          or SOURCE_NOT_LISTED)
    now = now_utc().isoformat()
    lake.write_json(
        layout.job_record(job_id),
        {
            **previous,
            "job_id": job_id,
            "kind": kind,
            "spec": spec,
            "status": status,
            "result": result,
            "submitted_by": ctx.submitted_by,
            "submitted_at": ctx.submitted_at,
            "started_at": previous.get("started_at") or now,
            "ended_at": None if status == "RUNNING" else now,
            "run_id": result.get("run_id") or previous.get("run_id"),
            "dataset": result.get("dataset") or getattr(job_spec, "dataset", None),
            "dataset_version": result.get("dataset_version") or result.get("version")
            if kind == "stage"
            else result.get("dataset_version"),
            "model": result.get("model") or getattr(job_spec, "model", None),
            "model_version": result.get("model_version")
            or (result.get("version") if kind == "train" else None),
        },
    )


def attach_log_tail(lake: Lake, job_id: str, status: str, logs: str, lines: int = 40) -> None:
    """Keep the end of the job's log with its record (the Ray head forgets it on restart)."""
    doc = lake.read_json_or_none(layout.job_record(job_id))
    if doc is None:
        return
    doc["log_tail"] = logs.splitlines()[-lines:]
    if doc.get("status") == "RUNNING":  # the driver died before it could say how it ended
        doc["status"] = status
        doc["ended_at"] = now_utc().isoformat()
    lake.write_json(layout.job_record(job_id), doc)


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
    for rel in lake.list_files(layout.JOBS):
        if not rel.endswith(".json"):
            continue
        doc = lake.read_json(rel)
        if _matches(doc, filters):
            rows.append(doc)
    return sorted(rows, key=lambda d: d.get("started_at") or d.get("ended_at") or "")
