"""Checks of a publish spec in the CLI process, before anything is submitted (no Ray)."""

from __future__ import annotations

from medray.cluster.infra import ray_local
from medray.cluster.infra.dicomweb_client import check_auth_file
from medray.cluster.store import runs
from medray.cluster.store.lake import Lake
from medray.workers.specs import PublishSpec


def precheck(spec: PublishSpec, lake: Lake, address: str | None) -> None:
    """The run must be committed; an auth file on this machine (a local cluster) private."""
    runs.read_commit(lake, spec.run_id)
    if spec.auth_file and ray_local.is_local(address):
        check_auth_file(spec.auth_file)
