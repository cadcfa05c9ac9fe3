"""Checks of a score spec in the CLI process, before anything is submitted (no Ray).

A refused spec costs the user nothing here (the CLI exits 2); on the cluster it would cost a
job start. The job driver repeats the size and resume checks (``job.py`` imports them from
here), because the lake can change between submission and start. ``claim`` takes the run's
lease for the job about to be submitted, so a second attempt at a live run is refused here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from medray.cluster.store import catalog, layout, leases, registry, runs
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, InputError
from medray.workers.models import ModelCard
from medray.workers.specs import ScoreSpec

log = logging.getLogger(__name__)


def precheck(spec: ScoreSpec, lake: Lake, address: str | None) -> None:
    """What a score job would refuse, checked before it is submitted."""
    dataset, dversion, manifest = catalog.resolve(lake, spec.dataset)
    check_sizes(registry.resolve(lake, spec.model), manifest, dataset, dversion)
    check_resume(lake, spec)
    if spec.retry_failed:
        runs.read_commit(lake, spec.retry_failed)
    if spec.gpus_per_actor and not spec.allow_cpu:
        have = cluster_gpus(address)
        if have is not None and have < spec.gpus_per_actor:
            raise ConfigError(no_gpu_message(spec.gpus_per_actor, have))


def claim(spec: ScoreSpec, lake: Lake, address: str | None,
          job_id: str) -> Callable[[], object] | None:
    """Take the run's lease for ``job_id`` before it is submitted (only a named ``--run-id``
    can meet another attempt); ConfigError (exit 2) names the live job that holds it. Returns
    what lets go of it when the job cannot be submitted after all."""
    if not spec.run_id:
        return None
    from medray.cluster.infra import jobs_client

    lease = leases.acquire(lake, spec.run_id, job_id,
                           lambda other: jobs_client.job_state(other, address), by="cli")
    return lease.release


def cluster_gpus(address: str | None) -> float | None:
    """GPUs of the cluster's alive nodes from its dashboard, or the most that a local
    autoscaling cluster can add; None when it cannot tell."""
    from medray.cluster.infra import jobs_client, ray_local

    reachable = ray_local.reachable(address)
    if reachable is not None:  # worker nodes start at zero: count what the autoscaler can add
        return reachable.get("GPU", 0.0)

    try:
        resp = jobs_client.client(address)._do_request("GET", "/nodes?view=summary")
        if resp.status_code != 200:
            return None
        nodes: list[dict[str, Any]] = resp.json().get("data", {}).get("summary", [])
    except Exception as exc:  # noqa: BLE001 - the job checks again on the cluster
        log.debug("cannot read the cluster's GPUs before submitting: %s", exc)
        return None
    return float(sum(n.get("raylet", {}).get("resourcesTotal", {}).get("GPU", 0) for n in nodes
                     if n.get("raylet", {}).get("state") == "ALIVE"))


def no_gpu_message(gpus: float, have: float) -> str:
    return (f"--gpus-per-actor {gpus:g} but the cluster has {have:g} GPU(s): start the cluster "
            "with GPUs (`medray cluster up --num-gpus N` or a GPU node type), drop "
            "--gpus-per-actor, or pass --allow-cpu to score on CPUs")


def check_sizes(card: ModelCard, manifest: dict[str, Any], dataset: str, dversion: int) -> None:
    """The dataset's images must have the model's input size and channels."""
    if (manifest["image_size"], manifest["channels"]) != (card.input_size, card.channels):
        raise ConfigError(
            f"model {card.name}:{card.version} takes {card.input_size}px x{card.channels} but "
            f"dataset {dataset}:{dversion} holds {manifest['image_size']}px "
            f"x{manifest['channels']}: stage the images at the model's size"
        )


def check_resume(lake: Lake, spec: ScoreSpec) -> dict[str, Any] | None:
    """The run.json of the run ``spec`` resumes; None when it starts a new run.

    Refuses a committed run id, and a resume whose options differ from the run's first start:
    the run's images would then depend on which attempt scored which shard.
    """
    run_id = spec.run_id
    if not run_id:
        return None
    if runs.is_committed(lake, run_id):
        raise InputError(f"run {run_id!r} is already committed; pick a new --run-id "
                         "(or leave it out) to score again")
    existing: dict[str, Any] | None = lake.read_json_or_none(layout.run_doc(run_id))
    if not existing:
        return None
    for key, wanted in _frozen_options(spec).items():
        if existing.get(key) != wanted:
            raise InputError(f"run {run_id!r} was started with {key}={existing.get(key)!r}, not "
                             f"{wanted!r}: resume it with the same options or use another "
                             "--run-id")
    _, dversion = catalog.parse_ref(spec.dataset)
    _, mversion, _ = registry.parse_ref(spec.model)
    for what, asked, frozen in (("dataset", dversion, existing["dataset_version"]),
                                ("model", mversion, existing["model_version"])):
        if asked is not None and asked != frozen:
            raise InputError(f"run {run_id!r} scores {what} version {frozen}, not {asked}: "
                             "resume it with the same version or use another --run-id")
    return dict(existing)


def _frozen_options(spec: ScoreSpec) -> dict[str, Any]:
    """What a resume must agree on with the run's first start, as run.json records it."""
    return {
        "dataset": catalog.parse_ref(spec.dataset)[0],
        "model": registry.parse_ref(spec.model)[0],
        "split": spec.split,
        "only_new": spec.only_new,
        "retry_failed": spec.retry_failed,
        "partition_by": spec.partition_by,
    }
