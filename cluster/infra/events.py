"""Structured progress events: what a job tells the CLI that follows it while it runs.

A job's progress is data, not prose: each event is one ``MEDRAY_EVENT {json}`` line on the
process's stdout (``wire.event_line``), which Ray carries into the job's log from the driver
and from any worker. The CLI turns them into a live bar per phase (``medray.jobs.progress``)
and shows nothing else of the log unless asked (``--verbose``). An event:

    {"phase": "staging", "unit": "files", "done": 480, "total": 840, "elapsed": 6.2,
     "final": false, "fields": {"images": 470, "errors": 0, "bytes": 1048576}}

``done``/``total`` are the bar's counts (``total`` null when unknown), ``elapsed`` the seconds
since the phase began (the CLI computes the rate and ETA from it, not from when the line
arrived, which the log poll delays), ``fields`` what the phase also counts: staging's bytes,
images and errors; training's step, loss, validation AUROC and seconds per epoch; scoring's
images, shards and errors. A ``note`` event carries a medray warning the user should see.
Events never hold a path, a patient key or a secret: counts, rates and metrics only.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from medray.cluster.infra import wire

EVERY_S = 2.0  # at most one event per phase this often (the CLI polls the log once a second)


def emit(event: dict[str, Any]) -> None:
    """Write one event line to stdout, whole (Ray forwards a worker's stdout line by line)."""
    sys.stdout.write(wire.event_line(event) + "\n")
    sys.stdout.flush()


def note(message: str, level: str = "warning") -> None:
    emit({"note": message, "level": level})


class Phase:
    """One phase of a job (``staging``, ``epoch 2/5``, ``scoring``...): what it counts, its
    total and when it began. ``update`` emits at most one event per ``every_s``; ``finish``
    always emits the phase's last event."""

    def __init__(self, name: str, unit: str, total: float | None, every_s: float = EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name, self.unit, self.total = name, unit, total
        self.every_s = every_s
        self._clock = clock
        self.started = clock()
        self._last: float | None = None

    def update(self, done: float, force: bool = False, **fields: Any) -> bool:
        """Emit ``done`` (and ``fields``) unless an event went out less than ``every_s`` ago
        (``force``: whenever); whether one was emitted."""
        now = self._clock()
        if not force and self._last is not None and now - self._last < self.every_s:
            return False
        self._send(done, False, fields, now)
        return True

    def finish(self, done: float | None = None, **fields: Any) -> None:
        """The phase's last event: ``done`` defaults to its total."""
        value = done if done is not None else (self.total or 0)
        self._send(value, True, fields, self._clock())

    def _send(self, done: float, final: bool, fields: dict[str, Any], now: float) -> None:
        self._last = now
        emit({"phase": self.name, "unit": self.unit, "done": done, "total": self.total,
              "elapsed": round(now - self.started, 3), "final": final, "fields": fields})


class NoteHandler(logging.Handler):
    """Carries medray's WARNING records to the CLI as note events, so a user who sees only the
    progress still learns, say, that there was no validation split. Errors are not sent: a
    failed job's error reaches the CLI on its own marker (``wire.error_line``)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno != logging.WARNING:
            return
        try:
            note(record.getMessage())
        except Exception:  # noqa: BLE001 - a note is never worth failing the job for
            self.handleError(record)
