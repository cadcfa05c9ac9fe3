"""Following a job in the terminal: its progress events as bars, and nothing else of its log.

The CLI hands a ``Follower`` to the SDK as ``on_log``: it receives the job's log text as it
grows and keeps whole lines. A progress event (``MEDRAY_EVENT``, see
``medray.cluster.infra.events``) updates the bar of its phase; a note event prints
``warning: ...``; every other line (the entrypoint with its spec, Ray's and TensorFlow's
start-up, the result marker) is dropped, or shown as it is with ``--verbose``.

On a terminal the bars are live (Rich): count, rate and ETA per phase. Anywhere else (CI,
cron, ``| tee``) progress is one plain line at most every ``every_s`` seconds, plus one line
when a phase ends, without a control character. Rates and ETAs come from the job's own clock
(each event's ``elapsed``), never from when the log poll happened to deliver the line.
Everything goes to stderr: stdout holds only the command's result.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Column
from rich.text import Text

from medray.cluster.infra import wire

PLAIN_EVERY_S = 5.0


# ------------------------------------------------------------------ what an event says
def rate(event: dict[str, Any]) -> float | None:
    """Units per second since the phase began; None before there is anything to divide."""
    elapsed = float(event.get("elapsed") or 0.0)
    done = float(event.get("done") or 0.0)
    return done / elapsed if elapsed > 0 and done > 0 else None


def eta(event: dict[str, Any]) -> float | None:
    """Seconds left at the phase's rate so far; None without a total or a rate."""
    total, per_s = event.get("total"), rate(event)
    if total is None or not per_s or event.get("final"):
        return None
    return max(0.0, (float(total) - float(event.get("done") or 0)) / per_s)


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _metric(value: Any, fmt: str) -> str:
    if not isinstance(value, int | float) or not math.isfinite(float(value)):
        return "n/a"
    return format(value, fmt)


# how each known field of an event reads; any other field shows as "name value"
_FIELDS: dict[str, Callable[[Any], str]] = {
    "step": lambda v: f"step {v}",
    "images": lambda v: f"{v} images",
    "duplicates": lambda v: f"{v} duplicates",
    "errors": lambda v: f"{v} errors",
    "shards": lambda v: f"{v} shards",
    "bytes": lambda v: f"{_size(float(v))} read",
    "loss": lambda v: f"loss {_metric(v, '.4f')}",
    "val_loss": lambda v: f"val loss {_metric(v, '.4f')}",
    "val_auroc": lambda v: f"val AUROC {_metric(v, '.4f')}",
    "images_per_s": lambda v: f"{_metric(v, '.0f')} images/s",
    "epoch_seconds": lambda v: f"{_metric(v, '.1f')}s/epoch",
}


def details(event: dict[str, Any]) -> str:
    parts = []
    for key, value in (event.get("fields") or {}).items():
        if value is None:
            continue
        show = _FIELDS.get(key)
        parts.append(show(value) if show else f"{key.replace('_', ' ')} {value}")
    return ", ".join(parts)


def count(event: dict[str, Any]) -> str:
    done, total, unit = event.get("done", 0), event.get("total"), event.get("unit", "")
    return f"{_number(done)}/{_number(total)} {unit}" if total is not None \
        else f"{_number(done)} {unit}"


def rate_text(event: dict[str, Any]) -> str:
    per_s = rate(event)
    return f"{per_s:.1f} {event.get('unit', '')}/s" if per_s is not None else ""


def plain_line(event: dict[str, Any]) -> str:
    """One line for a log that is not a terminal: printable characters only."""
    phase = event.get("phase", "job")
    if event.get("final"):
        head = f"{phase}: done, {count(event)} in {duration(event.get('elapsed'))}"
        speed = rate_text(event)
        parts = [head + (f" ({speed})" if speed else "")]
    else:
        parts = [f"{phase}: {count(event)}"]
        total = event.get("total")
        if total:
            parts[0] += f" ({100.0 * float(event.get('done') or 0) / float(total):.0f}%)"
        if rate_text(event):
            parts.append(rate_text(event))
        if eta(event) is not None:
            parts.append(f"ETA {duration(eta(event))}")
    if details(event):
        parts.append(details(event))
    return "".join(ch for ch in ", ".join(parts) if ch.isprintable())


# ------------------------------------------------------------------ the two renderers
class LiveBars:
    """A live Rich bar per phase on a terminal; a finished phase keeps its last line. On a
    narrow terminal a phase's details are cut short first, never its counts."""

    COLUMNS = ("count", "rate", "eta", "extra")

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar_width = 20 if console.width >= 120 else 10  # an 80-column terminal too
        self.progress = Progress(
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=self.bar_width),
            *(TextColumn(f"{{task.fields[{name}]}}", markup=False,
                         table_column=Column(no_wrap=True)) for name in self.COLUMNS),
            console=console,
            refresh_per_second=4,
        )
        self.tasks: dict[str, TaskID] = {}
        self.details: dict[TaskID, str] = {}
        self.started = False
        self._waiting: TaskID | None = None

    def _start(self) -> None:
        if not self.started:
            self.progress.start()
            self.started = True

    def waiting(self) -> None:
        """The job's driver is up, its first phase not yet: a bar that says so (Ray and
        TensorFlow start-up take a while)."""
        self._start()
        self._waiting = self.progress.add_task("starting the job", total=None, count="",
                                               rate="", eta="", extra="")

    def event(self, event: dict[str, Any]) -> None:
        self._start()
        if self._waiting is not None:
            self.progress.remove_task(self._waiting)
            self._waiting = None
        phase = str(event.get("phase", "job"))
        left = eta(event)
        when = f"in {duration(event.get('elapsed'))}" if event.get("final") else \
            f"ETA {duration(left)}" if left is not None else ""
        fields: dict[str, Any] = {"count": count(event), "rate": rate_text(event),
                                  "eta": when, "extra": ""}
        total = event.get("total")
        done = float(event.get("done") or 0)
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total, **fields)
        if event.get("final") and total is None:
            total = done  # a phase of unknown size is full when it ends
        self.details[self.tasks[phase]] = details(event)
        self.progress.update(self.tasks[phase], completed=done, total=total, **fields)
        self._fit()
        self.progress.refresh()

    def _fit(self) -> None:
        """Cut every phase's details to what the terminal's width leaves after the counts."""
        tasks = [t for t in self.progress.tasks if t.id in self.details]
        used = max(len(t.description) for t in tasks) + self.bar_width + len(self.COLUMNS) + 1
        used += sum(max(len(str(t.fields.get(n, ""))) for t in tasks) for n in self.COLUMNS[:-1])
        room = self.console.width - used - 1
        for task in tasks:
            text = self.details[task.id]
            if len(text) > room:
                text = text[:room - 1] + "\u2026" if room > 8 else ""
            self.progress.update(task.id, extra=text)

    def text(self, line: str) -> None:
        self.console.print(Text.from_ansi(line), soft_wrap=True, highlight=False)

    def close(self) -> None:
        if self._waiting is not None:  # a job that ended before any phase (or failed)
            self.progress.remove_task(self._waiting)
            self._waiting = None
        if self.started:
            self.progress.refresh()
            self.progress.stop()


class PlainLines:
    """At most one progress line per ``every_s`` (and one per finished phase): for logs."""

    def __init__(self, out: IO[str], every_s: float = PLAIN_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.every_s, self.clock = out, every_s, clock
        self._last: float | None = None

    def event(self, event: dict[str, Any]) -> None:
        now = self.clock()
        if not event.get("final") and self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        self._write(plain_line(event))

    def text(self, line: str) -> None:
        self._write(Text.from_ansi(line).plain)

    def waiting(self) -> None:
        pass  # a log gets a line when there is progress to tell

    def _write(self, line: str) -> None:
        self.out.write("".join(ch for ch in line if ch.isprintable() or ch == "\t") + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ the follower
class Follower:
    """``on_log`` for the SDK: splits the growing log into lines and routes each one."""

    def __init__(self, bars: LiveBars | PlainLines, verbose: bool = False) -> None:
        self.bars, self.verbose = bars, verbose
        self._partial = ""
        self._seen_event = self._seen_text = False
        self._finished: set[str] = set()  # a phase shows its end once, however often logged

    def __call__(self, text: str) -> None:
        if not self._seen_text and not self._seen_event:
            self.bars.waiting()
        self._seen_text = True
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.line(line.rstrip("\r"))

    def line(self, line: str) -> None:
        event = wire.event_in(line)
        if event is not None:
            self._seen_event = True
            if "note" in event:
                self.bars.text(f"{event.get('level', 'note')}: {event['note']}")
            elif "phase" in event and event["phase"] not in self._finished:
                if event.get("final"):
                    self._finished.add(event["phase"])
                self.bars.event(event)
        elif self.verbose and line.strip() and not wire.is_wire(line):
            self.bars.text(line)

    def close(self) -> None:
        if self._partial:
            self.line(self._partial)
            self._partial = ""
        self.bars.close()


def follower(verbose: bool = False, console: Console | None = None) -> Follower:
    """Live bars when stderr is a terminal, plain lines otherwise."""
    console = console or Console(stderr=True)
    if console.is_terminal:
        return Follower(LiveBars(console), verbose)
    return Follower(PlainLines(console.file if console.file is not None else sys.stderr),
                    verbose)
