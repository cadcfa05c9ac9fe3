"""The process Ray runs for every medray job: ``python -m medray.jobs.entry KIND --spec B64``.

It decodes and re-validates the spec, connects to the cluster, runs the job's ``run(spec, lake,
ctx)`` from its package under ``medray.cluster`` and prints one result line that the CLI reads
back (see ``medray.cluster.infra.wire``). A failure prints the error line and exits with the
error's code (2 for bad input found only on the cluster, 1 otherwise). SIGTERM (``medray jobs
stop``) becomes ``JobStopped`` once Ray is up, so the job's clean-up runs and its history
says STOPPED. Once the result or error line is out, and with it the job's record and every lake
write, the process leaves at once: Python's and Ray's teardown took about 1 s on 2 cores, which
the user waited for and which does nothing a finished job needs (Ray frees the job's workers
when its driver is gone, as it does after a normal exit).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from typing import Any, NoReturn

from medray.cluster.infra import logs, stopping, wire
from medray.cluster.infra.context import JobContext
from medray.cluster.infra.stopping import JobStopped
from medray.workers.errors import MedrayError
from medray.workers.specs import SPECS, JobSpec, build_spec

log = logging.getLogger(__name__)


def decode_spec(kind: str, payload: str) -> JobSpec:
    values = json.loads(base64.urlsafe_b64decode(payload))
    return build_spec(kind, values)  # re-validated on the cluster: the same rules as the CLI's


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medray.jobs.entry")
    parser.add_argument("kind", choices=sorted(SPECS))
    parser.add_argument("--spec", required=True, help="base64 JSON of the validated spec")
    args = parser.parse_args(argv)
    _quiet_warnings()
    logs.configure()
    ctx = JobContext.from_env(args.kind)
    spec: JobSpec | None = None
    try:
        spec = decode_spec(args.kind, args.spec)
        result = _run(spec, ctx)
    except JobStopped as exc:
        _fail(ctx, spec, str(exc), MedrayError.exit_code, status="STOPPED")
        return MedrayError.exit_code
    except MedrayError as exc:
        _fail(ctx, spec, exc.message, exc.exit_code)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - reported to the CLI as a failed job
        traceback.print_exc()
        _fail(ctx, spec, f"{type(exc).__name__}: {exc}", MedrayError.exit_code)
        return MedrayError.exit_code
    print(wire.result_line(result), flush=True)  # noqa: T201 - the wire to the CLI
    return 0


def _quiet_warnings() -> None:
    """Ray's and TensorFlow's deprecation notices are for their developers, not for the user
    reading the job's log (the job's processes get the same filter through PYTHONWARNINGS)."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(ray|tensorflow|keras)\.")


def _run(spec: JobSpec, ctx: JobContext) -> dict[str, Any]:
    import ray

    from medray.cluster.infra import costs, env
    from medray.cluster.store import history, runs
    from medray.cluster.store.lake import Lake, default_lake_uri

    ray.init(address=env.get(env.RAY_ADDRESS, "auto"), logging_level=logging.WARNING,
             log_to_driver=True)
    stopping.raise_on_sigterm()  # after ray.init, which installs a bare sys.exit handler
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False
    data_ctx.print_on_execution_start = False
    lake = Lake(spec.lake or default_lake_uri())
    job = importlib.import_module(f"medray.cluster.{spec.kind}.job")
    history.record(lake, ctx, spec, "RUNNING", {})
    started = time.monotonic()
    result: dict[str, Any] = job.run(spec, lake, ctx)
    # CPUs the driver held to do the work itself (a one-worker CPU training), beside its
    # tasks' and actors'
    result["usage"] = costs.job_usage(time.monotonic() - started,
                                      driver_held=result.pop("driver_held", None))
    price = costs.cost(result["usage"], costs.prices_from_env(), result.get("images"))
    if price:
        result["cost"] = price
    if spec.kind == "score" and result.get("run_id"):
        runs.record_usage(lake, result["run_id"], ctx.job_id, result)
    history.record(lake, ctx, spec, "SUCCEEDED", result)
    return result


def _fail(ctx: JobContext, spec: JobSpec | None, message: str, exit_code: int,
          status: str = "FAILED") -> None:
    log.error("%s job %s: %s", ctx.kind, "failed" if status == "FAILED" else "stopped", message)
    print(wire.error_line(message, exit_code), flush=True)  # noqa: T201 - the wire to the CLI
    if spec is None:
        return
    try:
        from medray.cluster.store import history
        from medray.cluster.store.lake import Lake, default_lake_uri

        history.record(Lake(spec.lake or default_lake_uri()), ctx, spec, status,
                       {"error": message})
    except Exception as exc:  # noqa: BLE001 - history is best effort when the lake is down
        log.warning("could not record job history: %s", exc)


def leave(code: int) -> NoReturn:
    """Exit with ``code`` now, the output flushed, without the interpreter's and Ray's teardown
    (BENCHMARKS.md "Start-up": about 1 s of every job's end on 2 cores)."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    leave(main())
