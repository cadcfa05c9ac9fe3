"""Job logging: every medray log line in a job (driver and Ray workers) carries the job id.

The id comes from ``MEDRAY_JOB_ID``, which Ray hands to every process of the job through its
runtime environment, so a filter on medray's own handler stamps it; no call site passes it.
medray's warnings also travel to the CLI as note events (``events.NoteHandler``): by default
the CLI shows progress and notes only, the log itself with ``--verbose``.
"""

from __future__ import annotations

import logging
import sys

from medray.cluster.infra import env, events

FORMAT = "%(asctime)s %(levelname)s [job %(job_id)s] %(name)s: %(message)s"
_NOISY = ("ray.data", "ray.train", "ray.tune", "absl", "tensorflow")


class JobIdFilter(logging.Filter):
    """Sets ``record.job_id`` from the process environment ('local' outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = env.get(env.JOB_ID, "local")
        return True


def configure(level: int = logging.INFO) -> None:
    """Send medray's records to stdout with the job id; idempotent, safe in every process."""
    root = logging.getLogger("medray")
    if any(isinstance(f, JobIdFilter) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.addHandler(events.NoteHandler())
    root.setLevel(level)
    root.propagate = False  # Ray's worker handlers would print every line a second time
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
