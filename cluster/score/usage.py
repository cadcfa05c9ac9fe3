"""What each attempt at a run used, recorded however the attempt ends.

Every score job keeps ``runs/<run_id>/usage/<job_id>.json``: written when its lease is taken,
every ``EVERY_S`` while it runs (marked ``RUNNING``), and when it ends: ``FAILED`` or
``STOPPED`` from here (``medray jobs stop`` leaves the driver ``STOP_GRACE_S`` for it), and
``SUCCEEDED`` from the job entrypoint with the result's cost. A driver killed outright leaves
its last ``RUNNING`` record. The report sums every file, so a run stopped and resumed pays for
both attempts.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from medray.cluster.infra import costs
from medray.cluster.infra.stopping import JobStopped
from medray.cluster.store import runs
from medray.cluster.store.lake import Lake

log = logging.getLogger(__name__)
EVERY_S = 30.0


class UsageRecorder:
    """Writes one job's usage file for one run."""

    def __init__(self, lake: Lake, run_id: str, job_id: str, started: float) -> None:
        self.lake, self.run_id, self.job_id = lake, run_id, job_id
        self.started = started  # the job's time.monotonic() start

    def _record(self, status: str, settle_tries: int) -> None:
        usage = costs.job_usage(time.monotonic() - self.started, settle_tries=settle_tries)
        result: dict[str, Any] = {"usage": usage,
                                  "cost": costs.cost(usage, costs.prices_from_env(), None)}
        runs.record_usage(self.lake, self.run_id, self.job_id, result, status=status)

    def running(self) -> None:
        """The usage so far (a chore of the lease keeper)."""
        self._record("RUNNING", settle_tries=0)

    def ended(self, exc: BaseException) -> None:
        """The usage of an attempt that ends with ``exc``; never raises (the job is already
        failing with the error that matters)."""
        status = "STOPPED" if isinstance(exc, JobStopped) else "FAILED"
        try:
            self._record(status, settle_tries=0 if status == "STOPPED" else 2)
            log.info("run %s: recorded the usage of this %s attempt", self.run_id,
                     status.lower())
        except Exception as err:  # noqa: BLE001 - best effort on the way out
            log.warning("run %s: could not record this attempt's usage: %s", self.run_id, err)
