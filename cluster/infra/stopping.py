"""A stopped job ends through its clean-up code, not in the middle of a write.

``medray jobs stop`` asks Ray to stop the job; Ray sends the job driver SIGTERM and SIGKILL
``STOP_GRACE_S`` later (``RAY_JOB_STOP_WAIT_TIME_S``, which every medray job carries). The
driver turns SIGTERM into ``JobStopped``, so ``finally`` blocks run: a score job records what
the stopped attempt used and lets go of its run. ``JobStopped`` is a ``BaseException``, like
``KeyboardInterrupt``, so no ``except Exception`` on the way swallows it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_GRACE_S = 20  # seconds between Ray's SIGTERM and its SIGKILL of a stopped job driver


class JobStopped(BaseException):
    """The job driver received SIGTERM (``medray jobs stop``)."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise JobStopped("stopped (SIGTERM, `medray jobs stop`)")


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises JobStopped in the main thread. Call after ``ray.init``,
    which installs its own handler (a bare ``sys.exit``)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)
