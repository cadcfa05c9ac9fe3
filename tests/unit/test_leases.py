"""A run's lease on a local lake, with Ray's view of each job faked: who may take it, when a
dead job's lease is taken over, heartbeats, the self-fence of an attempt that cannot renew, and
the keeper thread. The same contract runs on the S3 server in
tests/integration/test_conditional_writes.py."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from medray.cluster.store import layout, leases
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, InfraError
from tests.support import conditional


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake"))


def _unknown(job_id: str) -> None:
    return None


def _age(lake: Lake, run_id: str, seconds: float) -> None:
    """Make the lease's last heartbeat ``seconds`` old (the holder stopped renewing)."""
    path = f"{lake.uri}/{layout.run_lease(run_id)}"
    with open(path) as fh:
        doc = json.load(fh)
    doc["heartbeat_at"] = (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()
    with open(path, "w") as fh:
        json.dump(doc, fh)


def test_lease_contract_on_a_local_lake(lake):
    conditional.check_leases(lake)


def test_the_cli_claims_for_a_job_id_and_that_job_adopts_it(lake):
    cli = leases.acquire(lake, "r", "job-1", _unknown, by="cli")
    job = leases.acquire(lake, "r", "job-1", _unknown, by="job")  # its own: adopted
    assert job.attempt != cli.attempt and job.doc["replaced"] == []
    with pytest.raises(leases.LeaseLostError):
        cli.check()  # the CLI's copy is stale now; only the job writes
    job.check()


def test_a_job_ray_does_not_know_keeps_its_lease_until_the_ttl(lake):
    leases.acquire(lake, "r", "job-1", _unknown, by="cli")  # e.g. a CLI killed before submit
    with pytest.raises(ConfigError, match="job-1 .not known to this cluster; its lease expires"):
        leases.acquire(lake, "r", "job-2", _unknown, by="cli")
    _age(lake, "r", leases.TTL_S + 5)
    taken = leases.acquire(lake, "r", "job-2", _unknown, by="cli")
    assert "Ray does not know job job-1" in taken.doc["replaced"][0]["why"]


@pytest.mark.parametrize("status", ["PENDING", "RUNNING"])
def test_a_job_ray_says_lives_keeps_its_lease_even_with_an_old_heartbeat(lake, status):
    leases.acquire(lake, "r", "job-1", _unknown, by="job")
    _age(lake, "r", 10 * leases.TTL_S)
    with pytest.raises(ConfigError) as info:
        leases.acquire(lake, "r", "job-2", {"job-1": status}.get, by="cli")
    assert f"job job-1 ({status.lower()})" in info.value.message
    assert "medray jobs stop job-1" in info.value.message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("status", sorted(leases.ENDED))
def test_a_job_ray_says_ended_loses_its_lease_at_once(lake, status):
    leases.acquire(lake, "r", "job-1", _unknown, by="job")
    taken = leases.acquire(lake, "r", "job-2", {"job-1": status}.get, by="job")
    assert taken.doc["replaced"][0]["why"] == f"Ray says job job-1 {status}"
    assert taken.replaced_owners() == ["job-1"]


def test_a_jobs_api_that_cannot_answer_takes_nothing_over(lake):
    def down(job_id: str) -> str | None:
        raise ConnectionError("refused")

    leases.acquire(lake, "r", "job-1", _unknown, by="job")
    _age(lake, "r", 10 * leases.TTL_S)
    with pytest.raises(InfraError, match="job-1 holds the run's lease and Ray cannot be asked"):
        leases.acquire(lake, "r", "job-2", down, by="cli")
    assert leases.read(lake, "r").owner == "job-1"


def test_an_attempt_that_cannot_renew_for_a_ttl_fences_itself(lake, monkeypatch):
    lease = leases.acquire(lake, "r", "job-1", _unknown, by="job")
    lease.check()
    later = time.monotonic() + leases.TTL_S
    monkeypatch.setattr(leases.time, "monotonic", lambda: later)
    with pytest.raises(leases.LeaseLostError, match="could not be renewed for"):
        lease.check()
    assert not lease.heartbeat(), "a fenced attempt renewed its lease"


def test_release_deletes_only_its_own_lease(lake):
    old = leases.acquire(lake, "r", "job-1", _unknown, by="job")
    new = leases.acquire(lake, "r", "job-2", {"job-1": "FAILED"}.get, by="job")
    assert not old.release()
    assert leases.read(lake, "r") is not None and leases.read(lake, "r").owner == "job-2"
    assert new.release() and leases.read(lake, "r") is None


def test_the_keeper_renews_the_heartbeat_and_runs_its_chores(lake):
    lease = leases.acquire(lake, "r", "job-1", _unknown, by="job")
    first = leases.read(lake, "r")
    ran: list[float] = []
    with leases.Keeper(lease, every=0.05, chores=((0.0, lambda: ran.append(1.0)),)):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (len(ran) < 3 or leases.read(lake, "r") == first):
            time.sleep(0.02)
    now = leases.read(lake, "r")
    assert len(ran) >= 3 and first is not None and now is not None
    assert now.doc["heartbeat_at"] > first.doc["heartbeat_at"]
    assert (now.owner, now.doc["attempt"]) == (lease.owner, lease.attempt)


def test_the_keeper_stops_renewing_a_lost_lease_and_a_failing_chore_is_harmless(lake):
    lease = leases.acquire(lake, "r", "job-1", _unknown, by="job")

    def broken() -> None:
        raise OSError("disk full")

    leases.acquire(lake, "r", "job-2", {"job-1": "FAILED"}.get, by="job")
    with leases.Keeper(lease, every=0.05, chores=((0.0, broken),)) as keeper:
        time.sleep(0.3)
        assert not keeper._thread.is_alive(), "the keeper still runs for a lost lease"
    assert leases.read(lake, "r") is not None and leases.read(lake, "r").owner == "job-2"


# ------------------------------------------------------------------ the CLI's claim (sdk.submit)
@pytest.fixture
def submit_env(lake, monkeypatch):
    """sdk.submit with the prechecks skipped and the Jobs API faked: returns the submissions."""
    from medray.cluster.infra import jobs_client
    from medray.jobs import sdk

    submitted: list[str] = []
    monkeypatch.setattr(sdk, "precheck", lambda spec, lk, address: None)
    # no model in this lake to name a run after: a made-up id stands for the SDK's
    monkeypatch.setattr(sdk, "with_ids", lambda spec, lk: spec.model_copy(
        update={"run_id": spec.run_id or "made-by-the-sdk"}))
    monkeypatch.setattr(jobs_client, "job_state",
                        lambda job_id, address: "RUNNING" if job_id in submitted else None)

    def submit(spec, address, job_id=None, extra_env=None):
        if spec.batch_size == 13:  # the test's way to make the Jobs API refuse
            from medray.workers.errors import InfraError

            raise InfraError("the Jobs API refused")
        submitted.append(job_id)
        return job_id

    monkeypatch.setattr(jobs_client, "submit", submit)
    return submitted


def _score(lake: Lake, **extra) -> dict:
    return {"dataset": "cxr", "model": "m", "run_id": "nightly", "lake": lake.uri, **extra}


def test_submit_claims_the_run_for_its_job_and_a_second_submit_is_refused(lake, submit_env):
    from medray.jobs import sdk

    first = sdk.submit("score", _score(lake), wait=False)
    assert leases.read(lake, "nightly").owner == first["job_id"] == submit_env[0]
    with pytest.raises(ConfigError) as info:
        sdk.submit("score", _score(lake), wait=False)
    assert first["job_id"] in info.value.message and "(running)" in info.value.message
    assert len(submit_env) == 1, "the refused command submitted a job"


def test_a_submission_that_fails_frees_the_claim(lake, submit_env):
    from medray.jobs import sdk
    from medray.workers.errors import InfraError

    with pytest.raises(InfraError):
        sdk.submit("score", _score(lake, batch_size=13), wait=False)
    assert leases.read(lake, "nightly") is None
    assert sdk.submit("score", _score(lake), wait=False)["job_id"] == submit_env[0]


def test_a_run_without_a_run_id_claims_nothing_in_the_cli(lake, submit_env):
    from medray.jobs import sdk

    sdk.submit("score", {**_score(lake), "run_id": None}, wait=False)
    assert lake.list_dirs("runs") == []  # the job names the run and takes its lease itself


def test_the_clis_view_of_a_job_maps_not_found_to_none(monkeypatch):
    from medray.cluster.infra import jobs_client

    class Client:
        def get_job_status(self, job_id: str):
            if job_id == "gone":
                raise RuntimeError("Request failed with status code 404: Job gone does not exist")
            if job_id == "boom":
                raise RuntimeError("Request failed with status code 500: internal")
            return type("S", (), {"value": "RUNNING"})()

    monkeypatch.setattr(jobs_client, "client", lambda address: Client())
    assert jobs_client.job_state("live", None) == "RUNNING"
    assert jobs_client.job_state("gone", None) is None
    with pytest.raises(RuntimeError, match="500"):  # an error is not "unknown"
        jobs_client.job_state("boom", None)
