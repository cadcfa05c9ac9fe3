"""The wire between a job and the CLI that follows it: three markers in the job's log.

A job ends by printing one ``MEDRAY_RESULT {json}`` line (success) or one ``MEDRAY_ERROR
{json}`` line (failure, with the exit code the CLI must return: 2 for bad input found only
on the cluster, 1 otherwise). While it runs, it prints ``MEDRAY_EVENT {json}`` lines: the
structured progress events of ``medray.cluster.infra.events``, which the CLI renders as bars
and never shows as text. The CLI reads all three back from the job's log.

An event may come from any process of the job: Ray forwards a worker's stdout into the job's
log behind a prefix such as ``(RayTrainWorker pid=812)``, so an event's marker is looked for
anywhere in its line, and its JSON is read up to its own end (Ray may append
``[repeated 2x across cluster]`` to a line).
"""

from __future__ import annotations

import json
from typing import Any

from medray.workers.errors import MedrayError
from medray.workers.jsonsafe import json_safe

RESULT = "MEDRAY_RESULT "
ERROR = "MEDRAY_ERROR "
EVENT = "MEDRAY_EVENT "
MARKERS = (RESULT, ERROR, EVENT)
_DECODER = json.JSONDecoder()


def result_line(result: dict[str, Any]) -> str:
    return RESULT + json.dumps(json_safe(result), default=str)


def error_line(message: str, exit_code: int) -> str:
    return ERROR + json.dumps({"message": message, "exit_code": exit_code})


def event_line(event: dict[str, Any]) -> str:
    return EVENT + json.dumps(json_safe(event), separators=(",", ":"), default=str)


def event_in(line: str) -> dict[str, Any] | None:
    """The event a log line carries, wherever its marker sits; None for any other line (or
    an event cut short)."""
    at = line.find(EVENT)
    if at < 0:
        return None
    try:
        doc, _ = _DECODER.raw_decode(line, at + len(EVENT))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def is_wire(line: str) -> bool:
    """Whether ``line`` carries one of the markers: the CLI never shows such a line as text."""
    return any(marker in line for marker in MARKERS)


def _last(text: str, marker: str) -> str | None:
    for line in reversed(text.splitlines()):
        if line.startswith(marker):
            return line[len(marker):]
    return None


def result_from_logs(text: str) -> dict[str, Any] | None:
    raw = _last(text, RESULT)
    return json.loads(raw) if raw else None


def error_from_logs(text: str) -> tuple[str, int] | None:
    """(message, exit code) of the job's error line; None when the job printed none."""
    raw = _last(text, ERROR)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
        return str(doc["message"]), int(doc["exit_code"])
    except (ValueError, KeyError, TypeError):  # not ours after all: a failed job, as it is
        return raw, MedrayError.exit_code
