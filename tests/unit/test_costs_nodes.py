"""Usage by node and node type (cluster/infra/costs.py): an actor restarted on another node
after its first node was lost pays for its time on both, each under its own node type."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from medray.cluster.infra import costs


def _task(kind: str, node: str | None, start: int, end: int | None, actor: str = "a1",
          res: dict | None = None) -> SimpleNamespace:
    t0 = 1_790_000_000_000  # epoch ms
    return SimpleNamespace(type=f"TaskType.{kind}", actor_id=actor, node_id=node,
                           start_time_ms=t0 + start, end_time_ms=end and t0 + end,
                           func_or_class_name="MapWorker.__init__",
                           required_resources=res or {})


def _cluster_reports(monkeypatch: pytest.MonkeyPatch, tasks: list[SimpleNamespace],
                     actors: list[tuple[str, str, str]]) -> None:
    """Ray's state API answers with ``tasks`` and ``actors`` (actor id, node, class) for a job
    on nodes n1 (gpu_spot) and n2 (gpu_ondemand), its driver on n3 (head)."""
    import ray
    import ray.util.state as state

    monkeypatch.setattr(state, "list_tasks", lambda **_: tasks)
    monkeypatch.setattr(state, "list_actors", lambda **_: [
        SimpleNamespace(actor_id=a, node_id=n, repr_name="", class_name=c) for a, n, c in actors])
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_job_id=lambda: "01000000"))
    monkeypatch.setattr(costs, "_node_types", lambda: {"n1": "gpu_spot", "n2": "gpu_ondemand",
                                                       "n3": "head"})


@pytest.fixture
def restarted_actor(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = [
        # created at t=0 asking 1 CPU + 1 GPU, calls on node n1 until it was lost at t=40 s ...
        _task("ACTOR_CREATION_TASK", None, 0, 5_000, res={"CPU": 1.0, "GPU": 1.0}),
        _task("ACTOR_TASK", "n1", 5_000, 20_000),
        _task("ACTOR_TASK", "n1", 20_000, 40_000),
        # ... then restarted on n2, calls from t=60 s to t=90 s
        _task("ACTOR_TASK", "n2", 60_000, 90_000),
    ]
    _cluster_reports(monkeypatch, tasks, [("a1", "n2", "MapWorker")])


def test_lost_node_keeps_its_time_under_its_type(restarted_actor: None) -> None:
    usage = costs.job_usage(100.0, settle_tries=0)
    assert usage["by_node"]["n1"] == {"node_type": "gpu_spot", "cpu_seconds": 40.0,
                                      "gpu_seconds": 40.0}
    assert usage["by_node"]["n2"]["gpu_seconds"] == 30.0
    assert usage["by_node_type"]["gpu_spot"]["gpu_seconds"] == 40.0
    assert usage["by_node_type"]["gpu_ondemand"]["gpu_seconds"] == 30.0
    assert usage["node_types"] == ["gpu_ondemand", "gpu_spot"]


def test_a_driver_that_trains_counts_the_cpus_it_held_on_its_node(
        restarted_actor: None) -> None:
    """A one-worker CPU training runs in its job's driver, on the worker's CPUs held on the
    driver's node (cluster/train/in_driver.py): they count for the time held, under that
    node's type, beside the job's actors."""
    usage = costs.job_usage(100.0, settle_tries=0,
                            driver_held={"node_id": "n3", "cpus": 2.0, "seconds": 100.0})
    assert usage["by_node"]["n3"] == {"node_type": "head", "cpu_seconds": 200.0,
                                      "gpu_seconds": 0.0}
    assert usage["cpu_seconds"] == 200.0 + 40.0 + 30.0
    assert usage["node_types"] == ["gpu_ondemand", "gpu_spot", "head"]
    # a driver that held nothing is not a node the job ran on
    assert "n3" not in costs.job_usage(100.0, settle_tries=0)["by_node"]


def test_labelled_type_reads_ray_and_local_labels() -> None:
    assert costs.labelled_type({"ray.io/node-group": "gpu_spot"}) == "gpu_spot"
    assert costs.labelled_type({costs.NODE_TYPE_LABEL: "cpu_spot"}) == "cpu_spot"
    assert costs.labelled_type({"market": "spot"}) is None


# a Ray Train worker asks for its placement group's bundle: Ray names those resources per group
PG = "598fd90b9b316cb40d645995e6be01000000"
BUNDLE = {f"CPU_group_0_{PG}": 1.0, f"CPU_group_{PG}": 1.0, f"GPU_group_0_{PG}": 1.0,
          f"GPU_group_{PG}": 1.0, f"bundle_group_0_{PG}": 0.001, f"bundle_group_{PG}": 0.001}


def test_placement_group_resources_count_as_the_plain_ones() -> None:
    assert costs.plain_resources({**BUNDLE, "memory": 5.0}) == {
        "CPU": 1.0, "GPU": 1.0, "bundle": 0.001, "memory": 5.0}
    assert costs.plain_resources({"CPU": 2.0}) == {"CPU": 2.0}


def test_a_train_worker_lost_with_its_node_keeps_its_gpu_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def worker(actor: str, kind: str, node: str | None, start: int, end: int | None,
               res: dict | None = None) -> SimpleNamespace:
        task = _task(kind, node, start, end, actor=actor, res=res)
        task.func_or_class_name = "RayTrainWorker.poll_status"
        return task

    tasks = [
        # the first worker: created at t=0, polled on n1 until t=30 s, when n1 was lost (the
        # poll that found it gone never started)
        worker("w1", "ACTOR_CREATION_TASK", None, 0, 2_000, res=BUNDLE),
        worker("w1", "ACTOR_TASK", "n1", 2_000, 2_001),
        worker("w1", "ACTOR_TASK", "n1", 29_999, 30_000),
        worker("w1", "ACTOR_TASK", None, 0, 33_000),
        # the restarted group's worker on n2, created at t=40 s, last poll ends at t=70 s
        worker("w2", "ACTOR_CREATION_TASK", None, 40_000, 41_000, res=BUNDLE),
        worker("w2", "ACTOR_TASK", "n2", 41_000, 70_000),
    ]
    tasks[3].start_time_ms = None
    _cluster_reports(monkeypatch, tasks, [("w1", "n1", "RayTrainWorker"),
                                          ("w2", "n2", "RayTrainWorker")])
    usage = costs.job_usage(80.0, settle_tries=0)
    assert usage["by_node"]["n1"] == {"node_type": "gpu_spot", "cpu_seconds": 30.0,
                                      "gpu_seconds": 30.0}
    assert usage["by_node"]["n2"]["gpu_seconds"] == 30.0
    assert usage["by_node_type"] == {
        "gpu_spot": {"cpu_seconds": 30.0, "gpu_seconds": 30.0},
        "gpu_ondemand": {"cpu_seconds": 30.0, "gpu_seconds": 30.0}}
    assert usage["gpu_seconds"] == 60.0
    assert usage["node_types"] == ["gpu_ondemand", "gpu_spot"]


def test_an_actor_lost_before_its_worker_reported_keeps_its_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers report their calls about once a second: a node lost sooner leaves only the calls'
    failures, which the owner reports with the node and an end time but no start (the events
    a real lost node left, probed on Ray 2.60)."""
    tasks = [
        _task("ACTOR_CREATION_TASK", None, 0, 1_000, res={"CPU": 1.0, "GPU": 1.0}),
        # on n1 nothing but failures: the call in progress and its retries until the restart
        _task("ACTOR_TASK", "n1", 0, 1_600),
        _task("ACTOR_TASK", "n1", 0, 2_600),
        # the restarted actor's calls on n2
        _task("ACTOR_TASK", "n2", 5_000, 9_000),
    ]
    tasks[1].start_time_ms = tasks[2].start_time_ms = None
    _cluster_reports(monkeypatch, tasks, [("a1", "n2", "MapWorker")])
    usage = costs.job_usage(10.0, settle_tries=0)
    assert usage["by_node"]["n1"] == {"node_type": "gpu_spot", "cpu_seconds": 2.6,
                                      "gpu_seconds": 2.6}
    assert usage["by_node"]["n2"]["gpu_seconds"] == 4.0
    assert usage["by_node_type"]["gpu_spot"]["gpu_seconds"] == 2.6
