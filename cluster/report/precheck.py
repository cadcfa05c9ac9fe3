"""Checks of a report spec in the CLI process, before anything is submitted (no Ray)."""

from __future__ import annotations

from medray.cluster.store import runs
from medray.cluster.store.lake import Lake
from medray.workers.specs import ReportSpec


def precheck(spec: ReportSpec, lake: Lake, address: str | None) -> None:
    """The run, and the runs to compare with, must be committed."""
    for run_id in (spec.run_id, spec.reference, spec.compare):
        if run_id:
            runs.read_commit(lake, run_id)
