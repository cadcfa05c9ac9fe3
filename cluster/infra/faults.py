"""Fault injection for the fault tests: the only place in medray that kills its own process
mid-work (a job's driver also leaves by ``os._exit``, but only once its result is out:
``jobs/entry.py``).

``MEDRAY_FAULT`` travels with a job's environment. Forms:

- ``stage_crash_on:TEXT``: a staging decoder dies on the first input whose URI contains TEXT;
- ``train_exit_after_epoch:N``: training rank 0 dies right after checkpointing epoch N;
- ``train_fail_after_epoch:N``: training rank 0 raises a retryable ``InfraError`` (storage
  trouble that may pass) right after checkpointing epoch N, so a test sees the training retried
  from that checkpoint (a retry resumes after epoch N, so the fault does not fire again);
- ``train_epoch_delay:S``: every training worker waits S seconds after each epoch's checkpoint,
  so a test can take a worker's node away between two epochs (without burning CPU);
- ``score_batch_delay:S``: a scorer actor waits S seconds after each batch, so a test's score
  job is still running (without burning CPU) when it stops, kills or races it;
- ``stage_pause_after_listing:S``: a DICOMweb staging waits S seconds between its QIDO-RS
  listing and the retrievals, so a test can stop the PACS mid-job.

Unset (every real run), every hook here is a no-op.
"""

from __future__ import annotations

import os

from medray.cluster.infra import env
from medray.workers.errors import InfraError

EXIT_CODE = 17  # what a test sees as the killed process's exit status


def _value(prefix: str) -> str | None:
    fault = env.get(env.FAULT)
    return fault[len(prefix):] if fault.startswith(prefix) else None


def stage_crash_text() -> str | None:
    """TEXT of ``stage_crash_on:TEXT``, or None."""
    return _value("stage_crash_on:") or None


def train_exit_epoch() -> int | None:
    """N of ``train_exit_after_epoch:N``, or None."""
    return _number(_value("train_exit_after_epoch:"))


def train_fail_epoch() -> int | None:
    """N of ``train_fail_after_epoch:N``, or None."""
    return _number(_value("train_fail_after_epoch:"))


def train_epoch_delay() -> float:
    """S of ``train_epoch_delay:S`` (0.0 when unset or not a number)."""
    return _seconds("train_epoch_delay:")


def score_batch_delay() -> float:
    """S of ``score_batch_delay:S`` (0.0 when unset or not a number)."""
    return _seconds("score_batch_delay:")


def stage_pause_after_listing() -> float:
    """S of ``stage_pause_after_listing:S`` (0.0 when unset or not a number)."""
    return _seconds("stage_pause_after_listing:")


def _seconds(prefix: str) -> float:
    value = _value(prefix)
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except ValueError:
        return 0.0


def _number(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def fail_retryably(epoch: int) -> None:
    """Raise the retryable error of ``train_fail_after_epoch:N``."""
    raise InfraError(f"MEDRAY_FAULT: storage trouble injected after epoch {epoch}")


def die() -> None:
    """End this process at once, as a crash or an OOM kill would (no clean-up runs)."""
    os._exit(EXIT_CODE)
