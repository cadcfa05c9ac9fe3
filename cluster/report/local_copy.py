"""The report one click away: a committed report's HTML page and its heatmap images, copied
from the lake into a folder on the user's machine, where a browser opens it from ``file://``.

The report itself lives in the lake (``runs/<run>/report/``), which may be S3, and no browser
opens ``s3://``. The page is self-contained (plots and heatmaps are embedded), so the HTML file
alone is the report; the PNGs come along for whoever wants the images themselves. Runs in the
CLI process (no Ray); what it copies is what the report's commit marker vouches for.
"""

from __future__ import annotations

import os
from pathlib import Path

from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, NotFoundError

HTML_NAME = "report.html"


def export(lake: Lake, run_id: str, dest: Path) -> Path:
    """Copy the report of ``run_id`` into ``dest`` (created); the local HTML file's path."""
    if not lake.exists(layout.run_report_commit(run_id)):
        raise NotFoundError(f"run {run_id!r} has no committed report in {lake.uri}: run "
                            f"`medray report {run_id}` first")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot write the report to {dest}: {exc.strerror}; pass "
                          "--output DIR with a folder you can write") from None
    heatmaps = layout.run_report_heatmaps(run_id)
    for rel in lake.list_files(heatmaps, recursive=True):
        target = (dest / "heatmaps" / rel[len(heatmaps) + 1:]).resolve()
        if dest.resolve() not in target.parents:  # never outside the folder asked for
            continue
        _write(target, lake.read_bytes(rel))
    html = dest / HTML_NAME
    _write(html, lake.read_bytes(layout.run_report_html(run_id)))  # last: the page is the copy
    return html


def _write(path: Path, data: bytes) -> None:
    """Atomic: a browser never opens half a page."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
