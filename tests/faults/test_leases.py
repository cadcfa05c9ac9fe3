"""One attempt at a time per run id, through the real CLI, real Ray and a real lake.

- two ``medray score --run-id X`` at once, on the S3 lake and on a local lake: one runs, the
  other exits 2 naming the job that holds the run;
- the CLI of a running job killed (a cron deadline): its job still owns the run, so a second
  command is refused until the job ends; ``medray jobs stop`` ends it, records what it used,
  and the next command takes the run over and commits exactly the clean run's rows; the
  report's cost sums both attempts.

(A SIGKILLed job driver, whose lease the next attempt takes over, is in
``test_scoring_faults.py``.) Score jobs here are slowed with ``score_batch_delay`` so they are
still running when raced, killed or stopped, without burning CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.support import faults as h
from tests.support.paths import MEDRAY, ROOT

pytestmark = [pytest.mark.integration]
PRICES = str(ROOT / "configs" / "cluster" / "prices.yaml")


def _score_args(lake: str, run_id: str) -> list[str]:
    return ["score", "--dataset", "pneu", "--model", "slow:1", "--split", "test",
            "--batch-size", "16", "--run-id", run_id, "--lake", lake]


@pytest.fixture(scope="module")
def local_lake(scoring, tmp_path_factory) -> str:
    """A local-folder lake holding the S3 lake's dataset and slow model (copied, not staged)."""
    root = tmp_path_factory.mktemp("leaselake") / "lake"
    base = h.lake_base(scoring.pipe.lake)
    local = pafs.LocalFileSystem()
    for part in ("datasets/pneu/1", "models/slow/1"):
        local.create_dir(str(root / part))
        pafs.copy_files(f"{base}/{part}", str(root / part), source_filesystem=scoring.fs,
                        destination_filesystem=local)
    return str(root)


def _committed_local(lake: str, run_id: str) -> pa.Table:
    run = Path(lake) / "runs" / run_id
    marker = json.loads((run / "_COMMITTED.json").read_text())
    return pa.concat_tables([pq.read_table(run / f) for f in marker["files"]])


@pytest.mark.parametrize("where", ["s3", "local"])
def test_two_scores_of_one_run_id_at_once_one_runs_and_the_other_exits_2(scoring, local_lake,
                                                                          where):
    lake = scoring.pipe.lake if where == "s3" else local_lake
    run_id = f"twice-{where}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "MEDRAY_FAULT": "score_batch_delay:0.3"}
    procs = [subprocess.Popen([MEDRAY, *_score_args(lake, run_id), "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, [err[-1500:] for _, err in outs])
    won, lost = outs[codes.index(0)], outs[codes.index(2)]
    job_id = json.loads(won[0].strip().splitlines()[-1])["job_id"]
    assert f"run {run_id!r} is being written by job {job_id}" in lost[1], lost[1][-1500:]
    assert "medray jobs stop" in lost[1]
    preds = h.committed(scoring.fs, lake, run_id)[1] if where == "s3" \
        else _committed_local(lake, run_id)
    h.assert_same_predictions(preds, scoring.ref)


def _lease(scoring, run_id: str) -> dict | None:
    path = f"{h.lake_base(scoring.pipe.lake)}/runs/{run_id}/_LEASE.json"
    return json.loads(h.read_object(scoring.fs, path)) if h.exists(scoring.fs, path) else None


def _usage(scoring, run_id: str, job_id: str) -> dict:
    path = f"{h.lake_base(scoring.pipe.lake)}/runs/{run_id}/usage/{job_id}.json"
    return json.loads(h.read_object(scoring.fs, path))


@pytest.mark.slow
def test_a_killed_cli_leaves_the_run_to_its_job_until_it_is_stopped_then_resumed(scoring):
    run_id = f"cronkill-{uuid.uuid4().hex[:6]}"
    env = {"MEDRAY_PRICES": PRICES}
    first = subprocess.Popen([MEDRAY, *scoring.score_args(run_id)],
                             env={**os.environ, **env, "MEDRAY_FAULT": "score_batch_delay:1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        scoring.first_shard_written(run_id)
        lease = _lease(scoring, run_id)
        assert lease is not None and lease["claimed_by"] == "job"
        job_id = lease["owner"]
        assert h.job_status(scoring.home, job_id) == "RUNNING"
    finally:
        first.kill()  # the CLI only (a scheduler's deadline): its job runs on
        first.wait(timeout=30)

    refused = h.cli(None, *scoring.score_args(run_id), check=False, env=env, timeout=300)
    assert refused.returncode == 2, refused.stderr[-1500:]
    assert f"is being written by job {job_id} (running)" in refused.stderr, refused.stderr[-1500:]
    assert h.job_status(scoring.home, job_id) == "RUNNING", "the refusal touched the live job"
    assert _lease(scoring, run_id)["owner"] == job_id

    h.cli(None, "jobs", "stop", job_id, timeout=120)
    assert h.wait_job(scoring.home, job_id, timeout=120) == "STOPPED"
    assert not scoring.is_committed(run_id)
    stopped = _usage(scoring, run_id, job_id)
    assert stopped["status"] == "STOPPED" and stopped["usage"]["cpu_seconds"] > 0, stopped

    resumed = h.cli(None, *scoring.score_args(run_id), "--json", "--verbose", env=env,
                    timeout=600)
    assert f"replacing job {job_id}: Ray says job {job_id} STOPPED" in resumed.stderr, \
        resumed.stderr[-3000:]
    second = json.loads(resumed.stdout.strip().splitlines()[-1])["job_id"]
    marker, preds = h.committed(scoring.fs, scoring.pipe.lake, run_id)
    h.assert_same_predictions(preds, scoring.ref)
    assert [a["job_id"] for a in marker["attempts"]] == [job_id, second]
    assert _lease(scoring, run_id) is None  # released at the commit

    report = h.cli_json(None, "report", run_id, "--n-boot", "20", "--lake", scoring.pipe.lake)
    summary = report["summary"]
    usages = [_usage(scoring, run_id, j) for j in (job_id, second)]
    assert [u["status"] for u in usages] == ["STOPPED", "SUCCEEDED"]
    assert summary["score_jobs"] == 2
    assert summary["cpu_seconds"] == pytest.approx(
        sum(u["usage"]["cpu_seconds"] for u in usages), abs=0.002)
    assert summary["cost_total"] == pytest.approx(
        sum(u["cost"]["total"] for u in usages), abs=2e-9)


_PROBE = ("import ray, sys; from medray.cluster.infra import jobs_client; "
          "ray.init(address='auto', logging_level='ERROR'); "
          "print('STATES', jobs_client.job_state_in_cluster(sys.argv[1]), "
          "jobs_client.job_state_in_cluster('medray-score-never-submitted'))")


def _jobs_api(home: Path, method: str, path: str, body: dict | None = None) -> dict:
    """The Jobs REST API with the cluster's token (no Ray client in the test process)."""
    import urllib.request

    cfg, token = h.ray_state(home)
    req = urllib.request.Request(f"{cfg['dashboard_url']}/api/jobs/{path}", method=method,
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return dict(json.loads(resp.read()))


def test_a_job_driver_sees_rays_status_of_other_jobs(scoring):
    """What a job driver asks before taking over a run's lease (Ray's state API, from inside
    the cluster): Ray's status of another job (the clean run's: SUCCEEDED) and None for a job
    Ray never had."""
    import shlex
    import sys

    marker, _ = h.committed(scoring.fs, scoring.pipe.lake, scoring.ref_run)
    probe = f"medray-probe-{uuid.uuid4().hex[:6]}"
    _jobs_api(scoring.home, "POST", "", {
        "entrypoint": shlex.join([sys.executable, "-c", _PROBE, marker["committed_by"]]),
        "submission_id": probe, "entrypoint_num_cpus": 0})
    status = h.wait_job(scoring.home, probe, timeout=120)
    logs = _jobs_api(scoring.home, "GET", f"{probe}/logs")["logs"]
    assert status == "SUCCEEDED", logs[-2000:]
    assert "STATES SUCCEEDED None" in logs, logs[-2000:]
