"""Checks of a score spec in the CLI process, before anything is submitted (no Ray)."""

from __future__ import annotations

from medray.cluster.store.lake import Lake
from medray.workers.specs import ScoreSpec


def precheck(spec: ScoreSpec, lake: Lake, address: str | None) -> None:
    from medray.cluster.score import job

    job.precheck(spec.model_dump(), lake, address)
