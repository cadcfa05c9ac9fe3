"""The SDK the CLI calls: validate a spec, check it against the lake, submit it as a Ray job,
follow it, and return its result. Usable from Python as well."""

from __future__ import annotations

import getpass
import json
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from medray.cluster import costs, history, jobs_client
from medray.cluster.lake import Lake, default_lake_uri
from medray.jobs.specs import build_spec
from medray.workers.errors import JobFailedError


def resolve_lake(uri: str | None) -> Lake:
    return Lake(uri or default_lake_uri())


def _precheck(kind: str, spec: dict[str, Any], lake: Lake, address: str | None) -> None:
    """Catch what a job would refuse before anything is submitted (exit code 2): bad dataset,
    model and run references, a resume with other options, GPUs the cluster lacks, weights."""
    from medray.cluster import ray_local

    if kind == "train":
        from medray.cluster import training

        training.precheck(spec, lake, check_network=ray_local.is_local(address))
    if kind == "score":
        from medray.cluster import scoring

        scoring.precheck(spec, lake, address)
    if kind == "report":
        from medray.cluster.scoring import read_commit

        read_commit(lake, spec["run_id"])
        for other in (spec.get("reference"), spec.get("compare")):
            if other:
                read_commit(lake, other)


def new_job_id(kind: str) -> str:
    return f"medray-{kind}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def submit(
    kind: str,
    values: dict[str, Any],
    address: str | None = None,
    wait: bool = True,
    on_log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    values = dict(values)
    lake = resolve_lake(values.get("lake") or None)
    values["lake"] = lake.uri
    spec = build_spec(kind, values).model_dump()
    _precheck(kind, spec, lake, address)
    job_id = new_job_id(kind)
    extra = {
        "MEDRAY_SUBMITTED_AT": datetime.now(UTC).isoformat(),
        "MEDRAY_SUBMITTED_BY": getpass.getuser(),
    }
    prices = costs.load_prices()
    if prices:  # not secret: the job prices its own usage
        extra["MEDRAY_PRICES_JSON"] = json.dumps(prices)
    jobs_client.submit(kind, spec, address, job_id=job_id, extra_env=extra)
    if not wait:
        return {"job_id": job_id, "status": "PENDING"}
    status, logs = jobs_client.wait(job_id, address, on_log=on_log)
    history.attach_log_tail(lake, job_id, status, logs)
    if status != "SUCCEEDED":
        message = jobs_client.error_from_logs(logs) or logs[-2000:]
        raise JobFailedError(f"{kind} job {job_id} {status.lower()}: {message}")
    result = jobs_client.result_from_logs(logs) or {}
    result.setdefault("job_id", job_id)
    return result


def stderr_log(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()
