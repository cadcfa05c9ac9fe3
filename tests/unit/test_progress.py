"""Progress events between a job and the terminal, without Ray: the job side emits marked JSON
lines (``cluster/infra/events.py``), the CLI side draws them as Rich bars on a terminal and as
spaced plain lines elsewhere (``jobs/progress.py``), and drops every other log line unless
``--verbose``. Also the report's local copy (``cluster/report/local_copy.py``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from medray.cluster.infra import events, wire
from medray.cluster.report import local_copy
from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.jobs import progress
from medray.workers.errors import NotFoundError

# what a job's log holds besides its events (the CLI shows none of it by default)
NOISE = [
    "Running entrypoint for job medray-stage-1: python -m medray.jobs.entry stage --spec "
    "eyJsYWtlIjogIi90bXAifQ==",
    "2026-11-30 17:00:01.1: I external/local_xla/xla/tsl/cuda/cudart_stub.cc:31] Could not "
    "find cuda drivers on your machine, GPU will not be used.",
    "E0000 00:00:1 cuda_executor.cc:1228] failed call to cuInit: UNKNOWN ERROR (303)",
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "(raylet) Progress bars disabled",
    'MEDRAY_RESULT {"dataset": "pneu", "version": 1}',
]


def _event(done: float, total: float | None = 100, elapsed: float = 2.0, final: bool = False,
           phase: str = "staging pneu:1", **fields: object) -> dict:
    return {"phase": phase, "unit": "files", "done": done, "total": total, "elapsed": elapsed,
            "final": final, "fields": fields}


def _log(*events_: dict, noise: bool = True) -> str:
    lines = list(NOISE) if noise else []
    lines += [wire.event_line(e) for e in events_]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- the job side
def test_a_phase_emits_at_most_one_event_per_interval_and_always_its_last(capsys) -> None:
    now = [0.0]
    bar = events.Phase("scoring", "shards", 10, every_s=1.0, clock=lambda: now[0])
    sent = []
    for step in range(10):  # ten updates over 2.25 s: at 0, 1.0 and 2.0 s only
        now[0] = step * 0.25
        sent.append(bar.update(step, images=step * 8))
    bar.finish(images=80)
    lines = capsys.readouterr().out.splitlines()
    assert sent.count(True) == 3 and len(lines) == 4
    last = wire.event_in(lines[-1])
    assert last == {"phase": "scoring", "unit": "shards", "done": 10, "total": 10,
                    "elapsed": 2.25, "final": True, "fields": {"images": 80}}


def test_an_event_is_found_behind_a_ray_worker_prefix_and_a_dedup_suffix() -> None:
    event = _event(3, phase="epoch 1/2")
    line = ("\x1b[36m(RayTrainWorker pid=812)\x1b[0m " + wire.event_line(event)
            + " [repeated 2x across cluster]")
    assert wire.event_in(line) == event
    assert wire.is_wire(line) and wire.event_in("MEDRAY_EVENT {cut") is None
    assert wire.event_in("epoch 1/2 step 3/9: loss 0.4") is None


def test_medray_warnings_travel_as_notes(capsys) -> None:
    import logging

    handler = events.NoteHandler()
    record = logging.LogRecord("medray.x", logging.WARNING, __file__, 1, "no val split: %s",
                               ("using test",), None)
    handler.handle(record)
    handler.handle(logging.LogRecord("medray.x", logging.ERROR, __file__, 1, "boom", (), None))
    lines = capsys.readouterr().out.splitlines()
    assert [wire.event_in(x) for x in lines] == [
        {"note": "no val split: using test", "level": "warning"}]


# ------------------------------------------------------------------------------ the CLI side
def test_a_terminal_shows_a_live_bar_with_count_rate_and_eta_and_nothing_else() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, record=True, width=160)
    follow = progress.follower(console=console)
    assert isinstance(follow.bars, progress.LiveBars)
    text = _log(_event(40, elapsed=2.0, images=39, errors=1, bytes=2_500_000))
    follow(text[:200])  # the log arrives in pieces that cut lines anywhere
    follow(text[200:])
    follow.close()
    shown = console.export_text()
    assert "staging pneu:1" in shown
    assert "40/100 files" in shown and "20.0 files/s" in shown and "ETA 3s" in shown
    assert "39 images" in shown and "1 errors" in shown and "2.5 MB read" in shown
    for noise in ("eyJsYWtl", "cudart_stub", "cuInit", "absl", "Progress bars disabled",
                  "MEDRAY_RESULT", "MEDRAY_EVENT"):
        assert noise not in shown, noise
    assert "\x1b[" in out.getvalue()  # a terminal: drawn with control sequences


def test_plain_output_prints_at_most_one_line_per_interval_and_one_per_finished_phase() -> None:
    out = io.StringIO()
    now = [0.0]
    follow = progress.Follower(progress.PlainLines(out, every_s=5.0, clock=lambda: now[0]))
    for second in range(12):  # an event a second for 12 s: lines at 0, 5 and 10 s
        now[0] = float(second)
        follow(_log(_event(second * 5, elapsed=second + 1.0), noise=second == 0))
    follow(_log(_event(100, elapsed=13.0, final=True, images=100), noise=False))
    follow.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0] == "staging pneu:1: 0/100 files (0%)"
    assert lines[1] == "staging pneu:1: 25/100 files (25%), 4.2 files/s, ETA 18s"
    assert lines[-1] == "staging pneu:1: done, 100/100 files in 13s (7.7 files/s), 100 images"
    assert "\x1b" not in out.getvalue()


def test_not_a_terminal_means_plain_lines_without_control_characters() -> None:
    out = io.StringIO()
    follow = progress.follower(console=Console(file=out))
    assert isinstance(follow.bars, progress.PlainLines)
    note = json.dumps({"note": "no labelled val split: validating on test",
                       "level": "warning"})
    follow(_log(_event(7, total=None, phase="report", step="metrics")) + wire.EVENT + note + "\n")
    follow.close()
    assert out.getvalue().splitlines() == [
        "report: 7 files, 3.5 files/s, step metrics",
        "warning: no labelled val split: validating on test"]


def test_verbose_shows_the_log_but_never_the_markers() -> None:
    out = io.StringIO()
    follow = progress.Follower(progress.PlainLines(out), verbose=True)
    follow(_log(_event(1, final=True)))
    follow.close()
    shown = out.getvalue()
    assert "cudart_stub" in shown and "Running entrypoint" in shown
    assert "MEDRAY_RESULT" not in shown and "MEDRAY_EVENT" not in shown


def test_rate_and_eta_come_from_the_jobs_clock() -> None:
    assert progress.rate(_event(30, elapsed=3.0)) == 10.0
    assert progress.eta(_event(30, elapsed=3.0)) == 7.0
    assert progress.eta(_event(30, total=None)) is None
    assert progress.rate(_event(0, elapsed=0.0)) is None
    assert progress.duration(3725) == "1h02m" and progress.duration(75) == "1m15s"


# ------------------------------------------------------------------------- the report's copy
def test_the_local_copy_holds_the_committed_page_and_its_images(tmp_path: Path) -> None:
    lake = Lake(str(tmp_path / "lake"))
    run = "cnn-v1-20261130T170000-abc123"
    with pytest.raises(NotFoundError, match="no committed report"):
        local_copy.export(lake, run, tmp_path / "out")
    lake.write_bytes(layout.run_report_html(run), b"<html>report</html>")
    lake.write_bytes(layout.run_report_heatmap(run, "pneumonia", 1, "ab" * 32), b"PNG")
    lake.write_json(layout.run_report_commit(run), {"run_id": run})
    page = local_copy.export(lake, run, tmp_path / "out")
    assert page == tmp_path / "out" / "report.html"
    assert page.read_bytes() == b"<html>report</html>"
    pngs = list((tmp_path / "out" / "heatmaps").rglob("*.png"))
    assert [p.read_bytes() for p in pngs] == [b"PNG"]


def test_a_phase_logged_twice_ends_once() -> None:
    out = io.StringIO()
    follow = progress.Follower(progress.PlainLines(out, clock=lambda: 0.0))
    end = _event(9, total=9, final=True, phase="epoch 1/1", loss=0.5)
    follow(_log(end, end, _event(3, phase="epoch 1/1"), noise=False))
    follow.close()
    assert out.getvalue().splitlines() == ["epoch 1/1: done, 9/9 files in 2s (4.5 files/s), "
                                           "loss 0.5000"]


def test_report_open_without_a_display_says_so_and_succeeds(monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from medray.jobs import cli, sdk

    page = tmp_path / "r1" / "report.html"
    monkeypatch.setattr(sdk, "submit", lambda kind, values, **_: {
        "run_id": "r1", "metrics": {}, "html_uri": "s3://b/lake/runs/r1/report/report.html"})
    monkeypatch.setattr(sdk, "report_copy", lambda run_id, lake, output=None: page)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "BROWSER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.platform", "linux")
    shown = CliRunner().invoke(cli.app, ["report", "r1", "--open"])
    assert shown.exit_code == 0, shown.output
    assert f"report: {page.as_uri()}" in shown.stdout
    assert f"not opened (no graphical display here): {page.as_uri()}" in shown.stderr
    as_json = CliRunner().invoke(cli.app, ["report", "r1", "--json"])
    assert as_json.exit_code == 0 and len(as_json.stdout.splitlines()) == 1
    assert json.loads(as_json.stdout)["html_url"] == page.as_uri()
