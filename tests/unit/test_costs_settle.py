"""The wait for Ray's task events at a job's end (cluster/infra/costs.py, issue 17): a job whose
events land soon pays a fraction of a second, not a whole second; one whose events lag still
waits for them, within the same bound as before."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from medray.cluster.infra import costs


def _call(landed: bool) -> SimpleNamespace:
    """An actor's method call on node n1, ending at 2 s; before its events land Ray lists it
    without its node and end time."""
    t0 = 1_790_000_000_000
    return SimpleNamespace(type="TaskType.ACTOR_TASK", actor_id="a1",
                           node_id="n1" if landed else None, start_time_ms=t0,
                           end_time_ms=t0 + 2_000 if landed else None,
                           func_or_class_name="Scorer.__call__", required_resources={})


class _Lagging:
    """Ray's state API whose events land ``lag_s`` seconds after the first listing (never for
    None); the pauses are recorded, not slept, and are the only time that passes."""

    def __init__(self, lag_s: float | None) -> None:
        self.lag_s, self.listings = lag_s, 0
        self.slept: list[float] = []

    def list_tasks(self, **_: object) -> list[SimpleNamespace]:
        self.listings += 1
        done = self.lag_s is not None and sum(self.slept) >= self.lag_s - 1e-9
        creation = SimpleNamespace(type="TaskType.ACTOR_CREATION_TASK", actor_id="a1",
                                   node_id=None, start_time_ms=1_790_000_000_000,
                                   end_time_ms=1_790_000_000_100,
                                   func_or_class_name="Scorer.__init__",
                                   required_resources={"CPU": 1.0})
        return [creation, _call(bool(done))]


@pytest.fixture
def lagging(monkeypatch: pytest.MonkeyPatch):
    import ray
    import ray.util.state as state

    def make(lag_s: float | None) -> _Lagging:
        api = _Lagging(lag_s)
        monkeypatch.setattr(state, "list_tasks", api.list_tasks)
        monkeypatch.setattr(state, "list_actors", lambda **_: [])
        monkeypatch.setattr(ray, "get_runtime_context",
                            lambda: SimpleNamespace(get_job_id=lambda: "01000000"))
        monkeypatch.setattr(costs, "_node_types", lambda: {"n1": "head"})
        monkeypatch.setattr(costs, "time", SimpleNamespace(sleep=api.slept.append))
        return api

    return make


def test_a_settled_job_lists_once_and_waits_not_at_all(lagging) -> None:
    api = lagging(lag_s=0.0)
    costs.job_usage(10.0)
    assert (api.listings, api.slept) == (1, [])


def test_events_that_land_soon_cost_a_fraction_of_a_second(lagging) -> None:
    # the previous code paused a whole second before the second listing
    api = lagging(lag_s=0.05)
    usage = costs.job_usage(10.0)
    assert api.listings == 2
    assert sum(api.slept) <= 0.2
    assert usage["cpu_seconds"] == 2.0  # the call's end counted: it waited for the event


def test_lagging_events_are_still_waited_for_within_the_bound(lagging) -> None:
    api = lagging(lag_s=None)  # never settles: the bound ends the wait
    costs.job_usage(10.0, settle_tries=3)
    assert sum(api.slept) == pytest.approx(3.0)
    assert api.listings == len(api.slept) + 1
    assert api.slept == sorted(api.slept[:-1]) + api.slept[-1:]  # growing (the last trimmed)


def test_events_that_land_after_a_second_are_still_counted(lagging) -> None:
    api = lagging(lag_s=1.2)
    usage = costs.job_usage(10.0, settle_tries=3)
    assert usage["cpu_seconds"] == 2.0
    # listed again soon after the events landed, not a whole bound later
    assert 1.2 <= sum(api.slept) <= 1.2 + api.slept[-1] <= 1.8


def test_no_settling_for_a_stopping_job(lagging) -> None:
    api = lagging(lag_s=None)
    costs.job_usage(10.0, settle_tries=0)
    assert (api.listings, api.slept) == (1, [])


@pytest.mark.parametrize("bound", [0.0, 1.0, 2.0, 3.0])
def test_settle_waits_start_short_and_sum_to_the_bound(bound: float) -> None:
    waits = costs.settle_waits(bound)
    assert sum(waits) == pytest.approx(bound)
    assert all(w <= 0.2 for w in waits[:2])
