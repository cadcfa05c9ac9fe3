"""Checks of a train spec in the CLI process, before anything is submitted (no Ray)."""

from __future__ import annotations

from medray.cluster.infra import ray_local
from medray.cluster.store.lake import Lake
from medray.workers.specs import TrainSpec


def precheck(spec: TrainSpec, lake: Lake, address: str | None) -> None:
    from medray.cluster.train import job

    job.precheck(spec.model_dump(), lake, check_network=ray_local.is_local(address))
