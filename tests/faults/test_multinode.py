"""A worker node of a local multi-node cluster (head + 2 worker raylets) dies mid-job: the
score run completes, on its own or on resume with the same --run-id, with the clean run's
predictions."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

import pytest

from tests.support import faults as h

pytestmark = [pytest.mark.integration, pytest.mark.slow]
log = logging.getLogger(__name__)


def _raylet_of(proc: h.psutil.Process, raylets: dict[int, h.psutil.Process]) -> int | None:
    try:
        return next((p.pid for p in proc.parents() if p.pid in raylets), None)
    except h.psutil.NoSuchProcess:
        return None


def test_worker_node_killed_mid_job(scoring, multinode):
    run_id = f"nodekill-{uuid.uuid4().hex[:6]}"
    # two half-CPU actors: Ray Data spreads them, so one sits on a worker node, and the
    # two surviving nodes still have room for both actors and the shard readers
    job_id = scoring.start(run_id, "--actors", "2", "--cpus-per-actor", "0.5",
                           env=multinode.env)
    # kill as soon as a scorer actor runs on a worker node: the run has a few seconds of
    # scoring left then (waiting for a first prediction file can be too late)
    raylets = {p.pid: p for p in h.find(multinode.temp_dir, "raylet/raylet")
               if "--head" not in h.cmdline(p)}
    assert len(raylets) == 2, f"expected 2 worker raylets, found {len(raylets)}"

    def hosting() -> list[int]:
        actors = h.find(multinode.temp_dir, "ScorerActor")
        return [pid for a in actors if (pid := _raylet_of(a, raylets))]

    # a node without a scorer would prove nothing: the test fails rather than kill an idle one
    target = raylets[h.wait_for("a scorer actor on a worker node", hosting, 300, every=0.1)[0]]
    fault_at = datetime.now(UTC)
    assert h.sigkill([target]) == [target.pid]
    assert not scoring.is_committed(run_id)
    status = h.wait_job(multinode.home, job_id, timeout=400)
    log.info("job %s after killing a node that hosted a scorer actor", status)
    if status != "SUCCEEDED":
        h.cli(None, *scoring.score_args(run_id), env=multinode.env, timeout=600)
    marker, preds = h.committed(scoring.fs, scoring.pipe.lake, run_id)
    assert datetime.fromisoformat(marker["committed_at"]) > fault_at
    h.assert_same_predictions(preds, scoring.ref)


def test_cluster_down_cli_stops_every_process(multinode):
    proc = h.cli(None, "cluster", "down", env=multinode.env, check=False, timeout=120)
    left = h.cluster_processes(multinode.temp_dir)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert not left, f"{len(left)} processes of the cluster still run"
