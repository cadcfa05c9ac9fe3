"""What the CLI prints: one JSON object for scripts or a line for people, aligned tables, and a
medray error as its message on stderr with the exit code its class carries.

Scripts read the last stdout line of ``--json``; progress and errors go to stderr so they never
mix with it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from medray.workers.errors import MedrayError
from medray.workers.jsonsafe import json_safe

T = TypeVar("T")


def call(fn: Callable[[], T]) -> T:
    """Run an SDK call; a medray error becomes its message and the exit code its class
    carries (2 bad usage, config or input; 1 a failed job or infrastructure)."""
    try:
        return fn()
    except MedrayError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_code) from None


def emit(obj: Any, as_json: bool, human: str | None = None) -> None:
    """``obj`` as one JSON line with ``--json``; else ``human``, or indented JSON without one."""
    if as_json:
        typer.echo(json.dumps(json_safe(obj), default=str))
    elif human is not None:
        typer.echo(human)
    else:
        typer.echo(json.dumps(json_safe(obj), indent=2, default=str))


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """``rows`` as left-aligned columns under a header; a missing or NaN cell shows as '-'."""
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4f}"
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ",".join(str(x) for x in value)
    return str(value)
