"""A cluster driven by Ray's real autoscaler (fake multi-node provider), started with
`medray cluster up --autoscale configs/cluster/autoscale-local.yaml`: GPU-typed worker nodes
start at zero, come when a score job asks for GPUs, go after the idle timeout, and one taken
away mid-score (its raylet killed, as spot capacity disappears) changes no committed row; one
taken away mid-training costs the epoch in progress, not those already checkpointed."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support import faults as h
from tests.support.paths import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]
log = logging.getLogger(__name__)

CONFIG = ROOT / "configs" / "cluster" / "autoscale-local.yaml"
GPU_TYPES = {"gpu_spot", "gpu_ondemand"}
# two scorer actors, one fake GPU each: the autoscaler must add two GPU nodes
GPU_ARGS = ("--actors", "2", "--gpus-per-actor", "1", "--cpus-per-actor", "1")


@dataclass
class Autoscaling:
    home: Path
    temp_dir: str
    env: dict

    def status(self) -> dict:
        return h.cli_json(None, "cluster", "status", env=self.env, timeout=60)

    def worker_types(self) -> list[str]:
        return sorted(n["node_type"] for n in self.status()["node_list"] if not n["is_head"])


@pytest.fixture(scope="module")
def autoscaling(scoring) -> Iterator[Autoscaling]:
    """The autoscaling cluster under its own MEDRAY_HOME, on the session's S3 lake."""
    home = Path(f"/tmp/mr-as-{uuid.uuid4().hex[:6]}")  # noqa: S108 - short: Ray socket paths
    (home / "lake").mkdir(parents=True, mode=0o700)
    shutil.copy(scoring.home / "lake" / "lake.json", home / "lake" / "lake.json")
    # a dead node is noticed in ~3 s instead of Ray's default ~15 s
    env = {"MEDRAY_HOME": str(home), "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}
    try:
        info = h.cli_json(None, "cluster", "up", "--autoscale", str(CONFIG), env=env,
                          timeout=400)
        yield Autoscaling(home, info["temp_dir"], env)
    finally:
        subprocess.run([sys.executable, "-c", "from medray.cluster.infra import ray_local; "
                        "ray_local.down()"], env={**os.environ, **env}, timeout=120, check=False)
        shutil.rmtree(home, ignore_errors=True)


def _actor_files(scoring, run_id: str) -> list[dict]:
    base = f"{h.lake_base(scoring.pipe.lake)}/runs/{run_id}/actors"
    return [json.loads(h.read_object(scoring.fs, path))
            for path in h.lake_files(scoring.fs, base) if path.endswith(".json")]


def test_score_scales_up_from_zero_then_down(scoring, autoscaling):
    assert autoscaling.worker_types() == [], "the cluster must start with no worker node"
    run_id = f"autoscale-{uuid.uuid4().hex[:6]}"
    res = h.cli_json(None, *scoring.score_args(run_id, *GPU_ARGS), env=autoscaling.env,
                     timeout=900)
    _, preds = h.committed(scoring.fs, scoring.pipe.lake, run_id)
    h.assert_same_predictions(preds, scoring.ref)
    # where the scorers ran: GPU-typed nodes the autoscaler added, recorded by each actor ...
    actors = [a for a in _actor_files(scoring, run_id) if a["job_id"] == res["job_id"]]
    assert len(actors) == 2 and {a["node_type"] for a in actors} <= GPU_TYPES, actors
    assert len({a["node_id"] for a in actors}) == 2, "two GPU actors need two GPU nodes"
    # ... and in the job's record (`medray jobs show`)
    record = h.cli_json(None, "jobs", "show", res["job_id"], "--lake", scoring.pipe.lake,
                        env=autoscaling.env)
    ran_on = set(record["result"]["usage"]["node_types"])
    assert ran_on & GPU_TYPES and ran_on <= GPU_TYPES | {"head"}, ran_on
    # idle nodes go after the config's 6 s idle timeout (plus the autoscaler's rounds)
    h.wait_for("the autoscaler to remove the idle GPU nodes",
               lambda: autoscaling.worker_types() == [], 180, every=3)


def test_gpu_node_lost_mid_score(scoring, autoscaling):
    run_id = f"preempt-{uuid.uuid4().hex[:6]}"
    # slowed (0.5 s per batch of 16), so the node is lost with scoring left to do
    job_id = scoring.start(run_id, *GPU_ARGS,
                           env={**autoscaling.env, "MEDRAY_FAULT": "score_batch_delay:0.5"})

    def scorer_on_worker() -> tuple[h.psutil.Process, h.psutil.Process] | None:
        raylets = {p.pid: p for p in h.find(autoscaling.temp_dir, "raylet/raylet")
                   if "--head" not in h.cmdline(p)}
        for actor in h.find(autoscaling.temp_dir, "ScorerActor"):
            try:
                parent = next((p for p in actor.parents() if p.pid in raylets), None)
            except h.psutil.NoSuchProcess:
                continue
            if parent is not None and _actor_id_of(scoring, run_id, actor.pid):
                return actor, parent  # its record is written once its model is loaded
        return None

    # kill once a scorer has loaded its model on a GPU node and is scoring: a node lost
    # before its actor did any work would prove nothing
    actor, raylet = h.wait_for("a scorer actor at work on a GPU node", scorer_on_worker, 400,
                               every=0.2)
    # the cluster's status sees the GPU nodes (so its empty list after a job means gone); the
    # dashboard it reads lists a node a moment after the node's raylet is up
    h.wait_for("the cluster's status to list a GPU node",
               lambda: set(autoscaling.worker_types()) & GPU_TYPES, 30, every=0.5)
    assert not scoring.is_committed(run_id)
    lost = next(a for a in _actor_files(scoring, run_id) if a["pid"] == actor.pid)
    fault_at = datetime.now(UTC)
    assert h.sigkill([raylet]) == [raylet.pid]
    status = h.wait_job(autoscaling.home, job_id, timeout=600)
    assert status == "SUCCEEDED", f"the job ended {status} after losing a GPU node"
    marker, preds = h.committed(scoring.fs, scoring.pipe.lake, run_id)
    assert datetime.fromisoformat(marker["committed_at"]) > fault_at
    h.assert_same_predictions(preds, scoring.ref)
    # the lost node's GPU time stays in the job's usage, under its node type
    record = h.cli_json(None, "jobs", "show", job_id, "--lake", scoring.pipe.lake,
                        env=autoscaling.env)
    usage = record["result"]["usage"]
    node = usage["by_node"].get(lost["node_id"])
    assert node is not None, f"no usage for the lost node {lost['node_id']}: {usage}"
    assert node["node_type"] == lost["node_type"] in GPU_TYPES
    held = (fault_at - datetime.fromisoformat(lost["started_at"])).total_seconds()
    assert node["gpu_seconds"] >= held, (node, held)
    assert usage["by_node_type"][lost["node_type"]]["gpu_seconds"] >= node["gpu_seconds"]


def test_gpu_node_lost_mid_train(scoring, autoscaling):
    """One training worker on a GPU node; the node is taken away (its raylet and every process
    under it killed) after the first checkpoint: Ray Train restarts the worker on another node
    from that checkpoint, the job succeeds and registers one model, and the lost node's time
    stays in the job's usage under its node type."""
    fs, lake = scoring.fs, scoring.pipe.lake
    started = time.monotonic()
    model, run_id, epochs = "preempted", f"ptrain-{uuid.uuid4().hex[:6]}", 2
    training = f"{h.lake_base(lake)}/models/{model}/_training/{run_id}"
    # each worker waits 3 s after each checkpoint: the node goes before the last epoch ends
    res = h.cli_json(None, "train", "--dataset", "pneu", "--model", model, "--epochs",
                     str(epochs), "--batch-size", "32", "--patience", "10", "--gpus-per-worker",
                     "1", "--cpus-per-worker", "1", "--run-id", run_id, "--lake", lake,
                     "--no-wait", env={**autoscaling.env, "MEDRAY_FAULT": "train_epoch_delay:3"})
    job_id = res["job_id"]

    def checkpointed() -> dict | None:
        path = f"{training}/checkpoints/latest.json"
        return json.loads(h.read_object(fs, path)) if h.exists(fs, path) else None

    def booked() -> dict | None:
        """The latest checkpoint once rank 0's file also records its epoch: the worker writes
        that file just after the checkpoint, then waits its 3 s, when the node goes."""
        latest, rank_file = checkpointed(), f"{training}/ranks/{job_id}-rank0.json"
        if latest is None or not h.exists(fs, rank_file):
            return None
        epochs = json.loads(h.read_object(fs, rank_file))["epochs"]
        return latest if str(latest["epoch"]) in epochs else None

    latest = h.wait_for("the first checkpoint and its epoch in rank 0's file", booked, 400,
                        every=0.2)
    rank0 = json.loads(h.read_object(fs, f"{training}/ranks/{job_id}-rank0.json"))
    lost = rank0["attempts"][0]
    assert lost["node_type"] in GPU_TYPES, lost
    raylets = {p.pid: p for p in h.find(autoscaling.temp_dir, "raylet/raylet")
               if "--head" not in h.cmdline(p)}
    worker = h.psutil.Process(lost["pid"])
    raylet = next(p for p in worker.parents() if p.pid in raylets)
    node = [raylet, *raylet.children(recursive=True)]
    fault_at = datetime.now(UTC)
    killed = h.sigkill(node)
    assert raylet.pid in killed and lost["pid"] in killed, (killed, lost)
    done = checkpointed()
    assert done is not None and done["epoch"] == latest["epoch"] < epochs, (latest, done)
    assert not h.exists(fs, f"{training}/final/result.json"), "training ended before the loss"
    before = json.loads(h.read_object(fs, f"{h.lake_base(lake)}/{done['dir']}/state.json"))

    lost_after = time.monotonic() - started
    # on failure, the job's log says why (a flake seen once could not be read afterwards)
    assert h.wait_job(autoscaling.home, job_id, timeout=600) == "SUCCEEDED", h.cli(
        None, "jobs", "logs", job_id, env=autoscaling.env, check=False).stdout[-6000:]
    log.info("training %s: node lost %.1f s after submission, job done %.1f s after the loss",
             run_id, lost_after, time.monotonic() - started - lost_after)
    record = h.cli_json(None, "jobs", "show", job_id, "--lake", lake, env=autoscaling.env)
    result = record["result"]
    # the restart is recorded, from the checkpoint that was there when the node went
    assert result["restarts"] == 1 and result["resumed_from_epochs"] == [done["epoch"]], result
    # one version registered, once
    assert result["version"] == 1
    models = f"{h.lake_base(lake)}/models/{model}"
    cards = [p for p in h.lake_files(fs, models) if not p.startswith(f"{models}/_training/")
             and p.endswith("/card.json")]
    assert cards == [f"{models}/1/card.json"], cards
    card = json.loads(h.read_object(fs, f"{h.lake_base(lake)}/models/{model}/1/card.json"))
    history = card["metrics"]["history"]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    # epochs up to the checkpoint were not trained again: their records are the checkpoint's
    assert len(before["history"]) == done["epoch"]
    assert history[:done["epoch"]] == before["history"]
    assert card["training"]["restarts"] == 1 and card["training"]["jobs"] == [job_id]
    rank0 = json.loads(h.read_object(fs, f"{training}/ranks/{job_id}-rank0.json"))
    assert len(rank0["attempts"]) == 2 and rank0["attempts"][1]["node_id"] != lost["node_id"]
    assert sorted(rank0["epochs"], key=int) == [str(e) for e in range(1, epochs + 1)]
    # the lost node's GPU time stays in the job's usage, under its node type: at least from the
    # worker's first epoch to the loss, less Ray Train's 2 s between health checks (the last
    # call the worker answered)
    usage = result["usage"]
    used = usage["by_node"].get(lost["node_id"])
    assert used is not None, f"no usage for the lost node {lost['node_id']}: {usage}"
    assert used["node_type"] == lost["node_type"]
    held = (fault_at - datetime.fromisoformat(lost["started_at"])).total_seconds()
    assert used["gpu_seconds"] >= held - 2.0, (used, held)
    assert usage["by_node_type"][lost["node_type"]]["gpu_seconds"] >= used["gpu_seconds"]
    assert lost["node_type"] in usage["node_types"]


def _actor_id_of(scoring, run_id: str, pid: int) -> str:
    """The actor id a scorer process recorded in the run's actors/ folder ('' if not yet)."""
    return next((a["actor_id"] for a in _actor_files(scoring, run_id) if a["pid"] == pid), "")
