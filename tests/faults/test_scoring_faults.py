"""Faults during a score job: a killed scorer actor, a killed job driver (whose files are then
damaged before the resume), the S3 server stopped for seconds. After each the run completes (on
its own or when resumed with the same --run-id) and its committed predictions equal the clean
run's: same images, once, same scores."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from medray.cluster.infra import s3server
from tests.support import faults as h

pytestmark = [pytest.mark.integration]


def _run_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


def _finish(scoring, run_id: str, job_id: str, allow_resume: bool) -> tuple[str, str | None]:
    """Wait for the job; when it did not succeed and resuming is allowed, resubmit the same
    run id. Returns (first job's status, the resume's stderr or None)."""
    status = h.wait_job(scoring.home, job_id, timeout=300)
    if status == "SUCCEEDED" or not allow_resume:
        return status, None
    proc = h.cli(None, *scoring.score_args(run_id), "--verbose", timeout=600)
    return status, proc.stderr


def _check_committed_after(scoring, run_id: str, fault_at: datetime) -> dict:
    marker, preds = h.committed(scoring.fs, scoring.pipe.lake, run_id)
    assert datetime.fromisoformat(marker["committed_at"]) > fault_at, \
        "the run was committed before the fault: it proves nothing"
    h.assert_same_predictions(preds, scoring.ref)
    assert marker["images"] == preds.num_rows and marker["errors"] == 0
    assert set(preds.column("run_id").to_pylist()) == {run_id}
    return marker


def test_scorer_actor_killed_mid_batch(scoring):
    run_id = _run_id("actorkill")
    job_id = scoring.start(run_id)
    scoring.first_shard_written(run_id)
    actors = h.wait_for("a ScorerActor process", lambda: h.find(scoring.temp_dir, "ScorerActor"),
                        60, every=0.1)
    fault_at = datetime.now(UTC)
    assert h.sigkill(actors), "no scorer actor was killed"
    assert not scoring.is_committed(run_id)
    status, resumed = _finish(scoring, run_id, job_id, allow_resume=True)
    _check_committed_after(scoring, run_id, fault_at)
    # Ray Data restarts the actor and retries its batch: the job should not even need a resume
    assert status == "SUCCEEDED", f"the job {status} after its scorer actor died (resume: " \
        f"{'ok' if resumed is not None else 'not needed'})"


def _damage(fs, files: list[str]) -> None:
    """What an OS crash or a careless hand leaves: the first file empty, the second with the
    right number of rows but image ids that are not its shard's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fs.open_output_stream(files[0]):
        pass  # zero bytes
    table = pq.read_table(files[1], filesystem=fs)
    assert table.num_rows > 0
    wrong = pa.array([f"{i:064x}" for i in range(table.num_rows)])
    pq.write_table(table.set_column(table.schema.get_field_index("image_id"), "image_id",
                                    wrong), files[1], filesystem=fs)


def test_job_driver_killed_then_resumed_with_same_run_id(scoring):
    """SIGKILL of the job driver leaves its lease behind: the next attempt takes it over (Ray
    says the job FAILED), checks the files the killed attempt wrote, scores again the one an
    OS crash emptied and the one whose ids are wrong, and commits exactly the clean rows."""
    run_id = _run_id("driverkill")
    # slowed, so the driver is killed with two shard files written and more to go
    job_id = scoring.start(run_id, env={"MEDRAY_FAULT": "score_batch_delay:0.5"})
    preds_dir = f"{h.lake_base(scoring.pipe.lake)}/runs/{run_id}/predictions"
    h.wait_for("two prediction files", lambda: len(h.lake_files(scoring.fs, preds_dir)) >= 2,
               240, every=0.1)
    drivers = [p for p, spec in h.job_drivers(scoring.temp_dir, "score")
               if spec.get("run_id") == run_id]
    assert len(drivers) == 1, f"expected one driver process of {run_id}, found {len(drivers)}"
    fault_at = datetime.now(UTC)
    assert h.sigkill(drivers)
    assert not scoring.is_committed(run_id)
    assert h.wait_job(scoring.home, job_id, timeout=120) == "FAILED"
    written = h.lake_files(scoring.fs, preds_dir)
    _damage(scoring.fs, written)
    proc = h.cli(None, *scoring.score_args(run_id), "--verbose", timeout=600)
    assert f"resuming run {run_id}" in proc.stderr
    assert f"replacing job {job_id}: Ray says job {job_id} FAILED" in proc.stderr, \
        proc.stderr[-3000:]
    # the resume keeps what the killed driver wrote, less the two damaged files
    assert f"{len(written) - 2} already written" in proc.stderr, proc.stderr[-3000:]
    assert "(2 rejected on checking)" in proc.stderr
    _check_committed_after(scoring, run_id, fault_at)


@pytest.mark.slow
def test_s3_server_stopped_for_seconds_mid_job(scoring):
    run_id = _run_id("s3pause")
    job_id = scoring.start(run_id)
    scoring.first_shard_written(run_id)
    fault_at = datetime.now(UTC)
    s3server.pause_for(8)  # SIGSTOP the whole SeaweedFS process group, then SIGCONT
    status, _ = _finish(scoring, run_id, job_id, allow_resume=False)
    assert status == "SUCCEEDED", f"the job {status} after an 8 s storage outage"
    _check_committed_after(scoring, run_id, fault_at)


@pytest.mark.slow
def test_two_runs_over_one_dataset_at_once_both_commit(scoring):
    runs = [_run_id("twin-a"), _run_id("twin-b")]
    jobs = [scoring.start(r) for r in runs]
    for run_id, job_id in zip(runs, jobs, strict=True):
        assert h.wait_job(scoring.home, job_id, timeout=400) == "SUCCEEDED"
    for run_id in runs:
        marker, preds = h.committed(scoring.fs, scoring.pipe.lake, run_id)
        h.assert_same_predictions(preds, scoring.ref)
        assert all(f.startswith("predictions/") for f in marker["files"])


def test_committed_run_id_is_refused_with_exit_2(scoring):
    marker_path = f"{h.lake_base(scoring.pipe.lake)}/runs/{scoring.ref_run}/_COMMITTED.json"
    before = h.read_object(scoring.fs, marker_path)
    proc = h.cli(None, *scoring.score_args(scoring.ref_run), check=False, timeout=300)
    after = h.read_object(scoring.fs, marker_path)
    assert before == after, "a refused run must not touch the committed one"
    assert "already committed" in proc.stderr and scoring.ref_run in proc.stderr, \
        proc.stderr[-2000:]
    assert proc.returncode == 2, (
        f"exit {proc.returncode}: the committed run id should be refused before submission "
        f"(exit 2), stderr: {proc.stderr[-500:]}")
