"""The process Ray runs for every medray job: ``python -m medray.jobs.entry KIND --spec B64``.

It decodes the spec, connects to the cluster, runs the job body from ``medray.cluster`` and
prints one ``MEDRAY_RESULT {json}`` line that the CLI reads back. Failures print
``MEDRAY_ERROR message`` and exit 1 (2 for bad input found only on the cluster).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import sys
import time
import traceback
from typing import Any

from medray.workers.errors import InputError, MedrayError

RUNNERS = {
    "stage": "medray.cluster.staging",
    "train": "medray.cluster.training",
    "score": "medray.cluster.scoring",
    "report": "medray.cluster.reporting",
}


def _clean(obj: Any) -> Any:
    """JSON without NaN (which is not JSON): NaN becomes null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medray.jobs.entry")
    parser.add_argument("kind", choices=sorted(RUNNERS))
    parser.add_argument("--spec", required=True, help="base64 JSON of the validated spec")
    args = parser.parse_args(argv)
    job_id = os.environ.get("MEDRAY_JOB_ID") or "local"
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [job {job_id}] %(name)s: %(message)s",
        stream=sys.stdout,
    )
    for noisy in ("ray.data", "ray.train", "ray.tune", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    spec = json.loads(base64.urlsafe_b64decode(args.spec))
    try:
        import importlib

        import ray

        from medray.cluster.lake import Lake, default_lake_uri
        from medray.jobs.specs import build_spec

        build_spec(args.kind, {k: v for k, v in spec.items()})  # re-validate on the cluster
        ray.init(
            address=os.environ.get("RAY_ADDRESS", "auto"),
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        lake = Lake(spec.get("lake") or default_lake_uri())
        module = importlib.import_module(RUNNERS[args.kind])
        from medray.cluster import history

        history.record(lake, job_id, args.kind, spec, "RUNNING", {})
        started = time.monotonic()
        result = module.run(spec, lake, job_id)
        from medray.cluster import costs

        result["usage"] = costs.job_usage(time.monotonic() - started)
        prices = json.loads(os.environ.get("MEDRAY_PRICES_JSON") or "null")
        price = costs.cost(result["usage"], prices, result.get("images"))
        if price:
            result["cost"] = price
        if args.kind == "score" and result.get("run_id"):
            history.record_run_usage(lake, result["run_id"], job_id, result)
        history.record(lake, job_id, args.kind, spec, "SUCCEEDED", result)
    except MedrayError as exc:
        _fail(job_id, args.kind, spec, exc.message, logging.getLogger("medray.jobs.entry"))
        return 2 if isinstance(exc, InputError) else 1
    except Exception as exc:  # noqa: BLE001 - reported to the CLI, then exit 1
        traceback.print_exc()
        _fail(
            job_id,
            args.kind,
            spec,
            f"{type(exc).__name__}: {exc}",
            logging.getLogger("medray.jobs.entry"),
        )
        return 1
    print("MEDRAY_RESULT " + json.dumps(_clean(result), default=str), flush=True)  # noqa: T201
    return 0


def _fail(job_id: str, kind: str, spec: dict[str, Any], message: str, log: logging.Logger) -> None:
    log.error("%s job failed: %s", kind, message)
    print("MEDRAY_ERROR " + message.replace("\n", " "), flush=True)  # noqa: T201
    try:
        from medray.cluster import history
        from medray.cluster.lake import Lake, default_lake_uri

        history.record(
            Lake(spec.get("lake") or default_lake_uri()),
            job_id,
            kind,
            spec,
            "FAILED",
            {"error": message},
        )
    except Exception as exc:  # noqa: BLE001 - history is best effort when the lake is down
        log.warning("could not record job history: %s", exc)


if __name__ == "__main__":
    sys.exit(main())
