"""What the CLI prints: one JSON object for scripts or a short summary for people, aligned
tables, and a medray error as its message on stderr with the exit code its class carries.

Scripts read the last stdout line of ``--json``; progress (``medray.jobs.progress``) and errors
go to stderr so they never mix with it. A job's human summary is a small table of what it
made, where its data is and what to run next; Rich prints it without colour or control
characters when stdout is not a terminal.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer

from medray.cluster.infra import env
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


def summary(title: str, facts: Sequence[tuple[str, Any]], where: Sequence[tuple[str, Any]] = (),
            next_steps: Sequence[str] = ()) -> None:
    """A job's human ending on stdout: ``title``, a two-column table of ``facts`` (None
    skipped), the URIs in ``where`` and the commands worth running next."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    console.print(Text(title, style="bold"))
    grid = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in facts:
        if value is not None:
            grid.add_row(Text(f"  {name}"), Text(_cell(value)))
    if grid.row_count:
        console.print(grid)
    for name, uri in where:
        if uri:
            console.print(Text(f"{name}: {uri}"))
    if next_steps:
        console.print(Text("next:", style="bold"))
        for command in next_steps:
            console.print(Text(f"  {command}"))


def seconds(value: Any) -> str | None:
    """A job's duration for a summary: ``12.3s``, or ``2m05s`` past a minute."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    if value < 60:
        return f"{value:.1f}s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes}m{rest:02d}s"


def open_in_browser(path: Path) -> str | None:
    """Open ``path`` in the default browser; None when it did, else why it did not. On Linux
    without a display only ``BROWSER`` is trusted: Python's fallback would be a console
    browser taking over the terminal."""
    import webbrowser

    headless = sys.platform.startswith("linux") and not any(
        env.get(name) for name in (env.DISPLAY, env.WAYLAND_DISPLAY, env.BROWSER))
    if headless:
        return "no graphical display here"
    try:
        opened = webbrowser.open(path.as_uri())
    except webbrowser.Error as exc:
        return f"no browser: {exc}"
    return None if opened else "no browser found"
