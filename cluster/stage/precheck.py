"""Checks of a stage spec in the CLI process, before anything is submitted (no Ray)."""

from __future__ import annotations

from medray.cluster.store.lake import Lake
from medray.workers.specs import StageSpec


def precheck(spec: StageSpec, lake: Lake, address: str | None) -> None:
    """Staging validates its source on the cluster, where the source is read."""
