"""Job history filters and the per-run cost that the report's summary carries (issue 7)."""

from __future__ import annotations

import pytest

from medray.cluster.infra import jobs_client
from medray.cluster.store import history, runs
from medray.cluster.store.lake import Lake
from medray.jobs import sdk
from medray.workers.errors import ConfigError


def _job(lake: Lake, job_id: str, **doc) -> None:
    lake.write_json(f"jobs/{job_id}.json", {"job_id": job_id, **doc})


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(str(tmp_path / "lake"))
    _job(lake, "medray-score-a", kind="score", status="SUCCEEDED", dataset="cxr",
         dataset_version=1, model="pneu", model_version=2, run_id="r1",
         started_at="2026-11-20T23:00:00+00:00")
    _job(lake, "medray-score-b", kind="score", status="FAILED", dataset="cxr",
         dataset_version=2, model="pneu", model_version=3, run_id="r2",
         started_at="2026-11-21T23:00:00+00:00")
    _job(lake, "medray-stage-c", kind="stage", status="SUCCEEDED", dataset="bones",
         dataset_version=1, started_at="2026-11-22T08:00:00+00:00")
    return lake


def _ids(rows) -> list[str]:
    return [r["job_id"] for r in rows]


def test_filters_by_dataset_model_run_and_date(lake):
    assert _ids(history.list_history(lake)) == ["medray-score-a", "medray-score-b",
                                                "medray-stage-c"]
    assert _ids(history.list_history(lake, dataset="cxr")) == ["medray-score-a", "medray-score-b"]
    assert _ids(history.list_history(lake, dataset="cxr:2")) == ["medray-score-b"]
    assert _ids(history.list_history(lake, model="pneu:2")) == ["medray-score-a"]
    assert _ids(history.list_history(lake, model="other")) == []
    assert _ids(history.list_history(lake, run_id="r2")) == ["medray-score-b"]
    assert _ids(history.list_history(lake, since="2026-11-21")) == ["medray-score-b",
                                                                    "medray-stage-c"]
    assert _ids(history.list_history(lake, until="2026-11-21")) == ["medray-score-a",
                                                                    "medray-score-b"]
    assert _ids(history.list_history(lake, kind="score", status="FAILED")) == ["medray-score-b"]


def test_jobs_list_reads_the_lake_without_a_cluster(lake, monkeypatch):
    monkeypatch.setattr(sdk, "resolve_lake", lambda uri: lake)
    monkeypatch.setattr(jobs_client, "list_jobs",
                        lambda address: [{"job_id": "medray-train-live", "kind": "train",
                                          "status": "RUNNING"}])
    rows = sdk.jobs_list(None, None, status="failed")
    assert _ids(rows) == ["medray-score-b"]
    assert rows[0]["dataset"] == "cxr:2" and rows[0]["model"] == "pneu:3"
    # A job only the live cluster knows is listed unless a filter needs its lake record.
    assert "medray-train-live" in _ids(sdk.jobs_list(None, None))
    assert "medray-train-live" not in _ids(sdk.jobs_list(None, None, dataset="cxr"))
    assert _ids(sdk.jobs_list(None, None, since="2026-11-22T00:00")) == ["medray-stage-c"]
    with pytest.raises(ConfigError, match="--since"):
        sdk.jobs_list(None, None, since="yesterday")


def test_run_cost_sums_every_job_of_a_resumed_run(lake):
    usage = {"cpu_seconds": 30.0, "gpu_seconds": 0.0}
    runs.record_usage(lake, "r1", "medray-score-a", {
        "usage": usage, "cost": {"total": 0.002, "currency": "USD"}, "images": 600})
    runs.record_usage(lake, "r1", "medray-score-x", {
        "usage": {"cpu_seconds": 10.0, "gpu_seconds": 4.0},
        "cost": {"total": 0.001, "currency": "USD"}, "images": 400})
    out = runs.run_cost(lake, "r1", images=1000)
    assert out["score_jobs"] == 2
    assert out["cpu_seconds"] == pytest.approx(40.0) and out["gpu_seconds"] == pytest.approx(4.0)
    assert out["cost_total"] == pytest.approx(0.003)
    assert out["cost_per_1000_images"] == pytest.approx(0.003)
    assert out["currency"] == "USD"


def test_run_cost_without_prices_says_none_rather_than_zero(lake):
    runs.record_usage(lake, "r2", "medray-score-b", {
        "usage": {"cpu_seconds": 5.0, "gpu_seconds": 0.0}, "cost": None, "images": 10})
    out = runs.run_cost(lake, "r2", images=10)
    assert out["cpu_seconds"] == pytest.approx(5.0)
    assert out["cost_total"] is None and out["cost_per_1000_images"] is None
    assert runs.run_cost(lake, "never-scored", images=5)["score_jobs"] == 0


def test_every_attempt_records_its_usage_however_it_ends(lake, monkeypatch):
    """A stopped attempt, a failed one and one killed outright (its last RUNNING record) are
    counted in the run's cost with the one that succeeded."""
    from medray.cluster.infra import costs
    from medray.cluster.infra.stopping import JobStopped
    from medray.cluster.score.usage import UsageRecorder

    seconds = iter([11.0, 7.0, 5.0])
    monkeypatch.setattr(costs, "job_usage", lambda wall, settle_tries=3: {
        "wall_seconds": wall, "cpu_seconds": next(seconds), "gpu_seconds": 0.0,
        "by_node_type": {}})
    UsageRecorder(lake, "r3", "medray-score-s", 0.0).ended(JobStopped("stop"))
    UsageRecorder(lake, "r3", "medray-score-f", 0.0).ended(RuntimeError("boom"))
    UsageRecorder(lake, "r3", "medray-score-k", 0.0).running()  # then SIGKILL: nothing more
    runs.record_usage(lake, "r3", "medray-score-ok", {"usage": {"cpu_seconds": 2.0}})
    statuses = {d["job_id"]: d["status"] for d in
                (lake.read_json(f"runs/r3/usage/{j}.json") for j in
                 ("medray-score-s", "medray-score-f", "medray-score-k", "medray-score-ok"))}
    assert statuses == {"medray-score-s": "STOPPED", "medray-score-f": "FAILED",
                        "medray-score-k": "RUNNING", "medray-score-ok": "SUCCEEDED"}
    out = runs.run_cost(lake, "r3", images=10)
    assert out["score_jobs"] == 4 and out["cpu_seconds"] == pytest.approx(25.0)


def test_a_usage_that_cannot_be_recorded_never_hides_the_jobs_error(lake, monkeypatch):
    from medray.cluster.infra import costs
    from medray.cluster.score.usage import UsageRecorder

    def down(*args, **kwargs):
        raise OSError("lake down")

    monkeypatch.setattr(costs, "job_usage", lambda wall, settle_tries=3: {"cpu_seconds": 1.0})
    monkeypatch.setattr(runs, "record_usage", down)
    UsageRecorder(lake, "r4", "medray-score-x", 0.0).ended(RuntimeError("the real error"))


def test_a_stage_record_never_keeps_the_source_as_given(tmp_path):
    """A DICOM folder is often named after its patient: the record holds the stage job's label
    of the source (a keyed pseudonym for DICOM), and nothing before the job has listed it."""
    from medray.cluster.infra.context import JobContext
    from medray.workers.specs import StageSpec

    lake = Lake(str(tmp_path / "lake"))
    ctx = JobContext(job_id="medray-stage-x", kind="stage", submitted_by="u", submitted_at=None)
    spec = StageSpec(source="/pacs/DOE^JANE_MRN4711", dataset="cxr")
    history.record(lake, ctx, spec, "RUNNING", {})
    doc = lake.read_json("jobs/medray-stage-x.json")
    assert doc["spec"]["source"] == history.SOURCE_NOT_LISTED
    history.record(lake, ctx, spec, "RUNNING", {"dataset": "cxr", "version": 1},
                   source_label="dicom:0123abcd")
    history.record(lake, ctx, spec, "SUCCEEDED", {"dataset": "cxr", "version": 1})
    raw = (tmp_path / "lake" / "jobs" / "medray-stage-x.json").read_text()
    assert "MRN4711" not in raw and "DOE" not in raw
    assert lake.read_json("jobs/medray-stage-x.json")["spec"]["source"] == "dicom:0123abcd"
