"""The wire between a job and the CLI that follows it: two markers in the job's log.

A job ends by printing one ``MEDRAY_RESULT {json}`` line (success) or one ``MEDRAY_ERROR
{json}`` line (failure, with the exit code the CLI must return: 2 for bad input found only
on the cluster, 1 otherwise). The CLI reads them back from the job's log.
"""

from __future__ import annotations

import json
from typing import Any

from medray.workers.errors import MedrayError
from medray.workers.jsonsafe import json_safe

RESULT = "MEDRAY_RESULT "
ERROR = "MEDRAY_ERROR "


def result_line(result: dict[str, Any]) -> str:
    return RESULT + json.dumps(json_safe(result), default=str)


def error_line(message: str, exit_code: int) -> str:
    return ERROR + json.dumps({"message": message, "exit_code": exit_code})


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
