"""A job's progress as notebook progress bars (``tqdm.auto``: a widget in Jupyter, text
elsewhere), for the notebook SDK (``medray.jobs.notebook``).

It reads what the SDK's ``on_log`` hands over while a job runs: the structured progress events
of ``cluster/infra/events.py`` (``MEDRAY_EVENT`` lines) become one bar per phase, with its
count, total, rate and the phase's fields; a ``note`` event (a medray warning) is printed
above the bars. Every other log line is left out (``Job.logs()`` shows the whole log). One
status line says what the job is doing: PENDING until its log starts, RUNNING, then how it
ended, so a job that emits no events still shows its status changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medray.cluster.infra import wire

BarFactory = Callable[..., Any]


def _default_factory(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


class NotebookProgress:
    """Pass an instance as ``on_log``; call :meth:`close` with the job's final status."""

    def __init__(self, kind: str, factory: BarFactory | None = None) -> None:
        self.kind = kind
        self._factory = factory or _default_factory
        self._pending = ""  # a line the last chunk cut short
        self._bars: dict[str, Any] = {}
        self.status = "PENDING"
        self._status = self._factory(desc=self._describe(), total=None,
                                     bar_format="{desc} [{elapsed}]", leave=True)

    def __call__(self, text: str) -> None:
        if self.status == "PENDING":
            self._set_status("RUNNING")  # the driver writes its log once it runs
        lines = (self._pending + text).split("\n")
        self._pending = lines.pop()
        for line in lines:
            self._line(line)

    def close(self, status: str) -> None:
        """Flush a last unterminated line, close every bar, show how the job ended."""
        if self._pending:
            self._line(self._pending)
            self._pending = ""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self._set_status(status)
        self._status.close()

    # ---------------------------------------------------------------- one log line
    def _line(self, line: str) -> None:
        event = wire.event_in(line)
        if event is None:
            return
        if "note" in event:
            self._status.write(f"{event.get('level', 'warning')}: {event['note']}")
        elif "phase" in event:
            self._phase(event)

    def _phase(self, event: dict[str, Any]) -> None:
        name = str(event["phase"])
        total = event.get("total")
        bar = self._bars.get(name)
        if bar is None:
            bar = self._factory(desc=name, total=total, unit=str(event.get("unit") or "it"),
                                leave=True)
            # the rate and ETA count from when the phase began on the cluster, not from
            # when its first event reached this process
            bar.start_t -= float(event.get("elapsed") or 0.0)
            self._bars[name] = bar
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = event.get("done") or 0
        fields = event.get("fields") or {}
        if fields:
            bar.set_postfix({k: _short(v) for k, v in fields.items()}, refresh=False)
        bar.refresh()
        if event.get("final"):
            bar.close()
            del self._bars[name]

    def _set_status(self, status: str) -> None:
        self.status = status
        self._status.set_description_str(self._describe())

    def _describe(self) -> str:
        return f"medray {self.kind}: {self.status}"


def _short(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value
