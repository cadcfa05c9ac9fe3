"""Submit, follow and manage medray jobs through the Ray Jobs API."""

from __future__ import annotations

import base64
import getpass
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

from medray.cluster.infra import env, ray_local, stopping, wire
from medray.workers.errors import InfraError, NotFoundError
from medray.workers.specs import JobSpec

log = logging.getLogger(__name__)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# How often a waiting CLI reads the log of a young job (and for how long a job is young), and
# asks the status of an exiting one: a status is cheap, a whole log is not
YOUNG_POLL_S = 0.5
YOUNG_FOR_S = 60.0
EXIT_POLL_S = 0.1
_EXIT_WAIT_S = 10.0  # then back to following the log: the driver may be stuck in its exit


def client(address: str | None) -> Any:
    url = ray_local.dashboard_url(address)
    if ray_local.is_local(address):
        ray_local.apply_auth_env()  # before Ray is imported: it reads the auth mode once
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(url)
    except Exception as exc:  # connection refused, auth failure: say which cluster
        raise InfraError(f"cannot reach the Ray Jobs API at {url}: {exc}") from exc


def job_python(address: str | None) -> str:
    """Interpreter for the job: this one on the local cluster, else MEDRAY_JOB_PYTHON/python."""
    if env.get(env.JOB_PYTHON):
        return env.get(env.JOB_PYTHON)
    return sys.executable if ray_local.is_local(address) else "python"


def submit(
    spec: JobSpec,
    address: str | None,
    job_id: str | None = None,
    metadata: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
) -> str:
    """Submit ``spec`` as a Ray job that runs ``medray.jobs.entry``; returns the job id."""
    kind = spec.kind
    # only the fields that were set: the job re-validates them and so knows which were given
    # (a score job chooses its pool's size where the user did not; cluster/score/sizing.py)
    payload = base64.urlsafe_b64encode(spec.model_dump_json(exclude_unset=True).encode()).decode()
    entrypoint = " ".join(
        shlex.quote(p)
        for p in (job_python(address), "-m", "medray.jobs.entry", kind, "--spec", payload)
    )
    env_vars = {k: os.environ[k] for k in env.PASS_TO_JOBS if os.environ.get(k)}
    env_vars.update({"PYTHONUNBUFFERED": "1", env.TF_CPP_MIN_LOG_LEVEL: "3",
                     # progress events from many actors look alike once Ray masks their
                     # numbers: never fold them into "[repeated Nx across cluster]"
                     env.RAY_DEDUP_LOGS_ALLOW_REGEX: wire.EVENT.strip(),
                     env.PYTHONWARNINGS: "ignore::DeprecationWarning",
                     # a stopped driver gets time to record its usage (see stopping.py)
                     env.RAY_JOB_STOP_WAIT: str(stopping.STOP_GRACE_S)})
    if job_id:
        env_vars[env.JOB_ID] = job_id
    env_vars.update(extra_env or {})
    meta = {"medray_kind": kind, "submitted_by": getpass.getuser(), **(metadata or {})}
    c = client(address)
    deadline = time.monotonic() + 90
    while True:
        try:
            return str(
                c.submit_job(
                    entrypoint=entrypoint,
                    submission_id=job_id,
                    runtime_env={"env_vars": env_vars},
                    metadata=meta,
                    entrypoint_num_cpus=0,
                )
            )
        except RuntimeError as exc:
            # a head that just started has no job agent yet: Ray says "try again later"
            if "try again later" not in str(exc) or time.monotonic() > deadline:
                raise InfraError(f"the Jobs API refused the {kind} job: {exc}") from exc
            time.sleep(2)


def status(job_id: str, address: str | None) -> str:
    try:
        return str(client(address).get_job_status(job_id).value)
    except RuntimeError as exc:
        raise NotFoundError(f"no job {job_id!r} on this cluster: {exc}") from exc


def job_state(job_id: str, address: str | None) -> str | None:
    """Ray's status of a job (RUNNING, STOPPED...), or None when the cluster does not know it.
    For the CLI process; a job driver asks :func:`job_state_in_cluster`."""
    try:
        return str(client(address).get_job_status(job_id).value)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise


def job_state_in_cluster(job_id: str) -> str | None:
    """:func:`job_state` from inside a job driver (Ray initialised), through Ray's state API,
    which finds the cluster's dashboard itself."""
    from ray.util.state import list_jobs

    for job in list_jobs(filters=[("submission_id", "=", job_id)], limit=10,
                         raise_on_missing_output=False):
        status = job.get("status") if isinstance(job, dict) else getattr(job, "status", None)
        if status is not None:
            return str(getattr(status, "value", status))
    return None


def logs(job_id: str, address: str | None) -> str:
    return str(client(address).get_job_logs(job_id))


def stop(job_id: str, address: str | None) -> bool:
    return bool(client(address).stop_job(job_id))


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    rows = []
    for info in client(address).list_jobs():
        rows.append(
            {
                "job_id": info.submission_id,
                "status": str(info.status.value),
                "kind": (info.metadata or {}).get("medray_kind", ""),
                "start_time": info.start_time,
                "end_time": info.end_time,
                "message": info.message,
            }
        )
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def wait(
    job_id: str,
    address: str | None,
    on_log: Callable[[str], None] | None = None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> tuple[str, str]:
    """Follow a job until it ends, passing new log text to ``on_log``; (status, full logs).
    With ``timeout_s``, give up after that long: the status returned is then not terminal.

    Small jobs are what users run all day, so the end is noticed quickly without asking more
    often during a long job: the log is read every ``YOUNG_POLL_S`` for the first
    ``YOUNG_FOR_S`` and every ``poll_s`` after that, and once the job has printed its result
    (or error) line only its exit is left, so the status is then asked every ``EXIT_POLL_S``.
    """
    c = client(address)
    started = time.monotonic()
    deadline = None if timeout_s is None else started + timeout_s
    seen = 0
    text = ""
    exit_waited = False  # the quick exit watch runs once; a stuck exit is followed as usual
    while True:
        state = str(c.get_job_status(job_id).value)
        text = str(c.get_job_logs(job_id))
        if on_log and len(text) > seen:
            on_log(text[seen:])
        seen = len(text)
        if state in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
            return state, text
        if not exit_waited and (wire.RESULT in text or wire.ERROR in text):  # exiting
            exit_waited = True
            state = _wait_exit(c, job_id, deadline)
            if state in TERMINAL:
                text = str(c.get_job_logs(job_id))
                if on_log and len(text) > seen:
                    on_log(text[seen:])
                return state, text
        fast = time.monotonic() - started < YOUNG_FOR_S
        time.sleep(min(poll_s, YOUNG_POLL_S) if fast else poll_s)


def _wait_exit(c: Any, job_id: str, deadline: float | None) -> str:
    """Ask the job's status every ``EXIT_POLL_S`` while its driver exits (at most
    ``_EXIT_WAIT_S``, and never past ``deadline``); the last status seen."""
    until = time.monotonic() + _EXIT_WAIT_S
    if deadline is not None:
        until = min(until, deadline)
    while True:
        state = str(c.get_job_status(job_id).value)
        if state in TERMINAL or time.monotonic() >= until:
            return state
        time.sleep(EXIT_POLL_S)
