"""Which failures of a training's workers Ray Train may retry (cluster/train/restarts.py), and
the record of the restarts: a lost node restarts the worker group; bad input, a bug or a
worker that crashed on a live node fail the job at once. No Ray cluster: Ray's errors are
built directly and its state API is replaced by the verdicts a test gives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.exceptions import RayActorError
from ray.train.v2._internal.exceptions import (
    UserExceptionWithTraceback,
    WorkerHealthCheckFailedError,
)
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.cluster.train import restarts
from medray.workers.errors import ConfigError, InfraError, InputError

ACTOR = "14eed1fed0fbf306f4bed9b501000000"


def _unanswered(preempted: bool = False) -> WorkerHealthCheckFailedError:
    """What Ray Train's controller sees when a worker stops answering its health check."""
    return WorkerHealthCheckFailedError(
        "A worker health check failed.",
        failure=RayActorError(actor_id=ACTOR, error_msg="unavailable", preempted=preempted))


class _Verdicts:
    """Ray's answers about the actor, one per question (the last one repeats)."""

    def __init__(self, *answers: tuple[str, str | None]) -> None:
        self.answers, self.asked = list(answers), 0

    def __call__(self, actor_id: str) -> tuple[str, str | None]:
        assert actor_id == ACTOR
        self.asked += 1
        return self.answers[min(self.asked, len(self.answers)) - 1]


def _lost(verdicts: _Verdicts, alive: set[str], wait_s: float = 5.0) -> bool:
    return restarts.node_lost(_unanswered(), verdicts, lambda: alive, wait_s=wait_s,
                              every_s=0.0)


# ----------------------------------------------------------------------------- lost or not
def test_a_worker_whose_node_died_is_lost_once_ray_declares_it_dead() -> None:
    # unavailable (the node not yet declared dead) twice, then dead on a node that is gone
    verdicts = _Verdicts(("ALIVE", "n1"), ("ALIVE", "n1"), ("DEAD", "n1"))
    assert _lost(verdicts, alive={"head", "n2"}) is True
    assert verdicts.asked == 3


def test_a_worker_that_crashed_on_a_live_node_is_not_a_lost_node() -> None:
    verdicts = _Verdicts(("DEAD", "n1"))
    assert _lost(verdicts, alive={"head", "n1"}) is False
    assert verdicts.asked == 1


def test_a_drained_node_is_lost_without_asking() -> None:
    verdicts = _Verdicts(("ALIVE", "n1"))
    assert restarts.node_lost(_unanswered(preempted=True), verdicts, lambda: {"n1"}) is True
    assert verdicts.asked == 0


def test_undecided_after_the_wait_counts_as_lost() -> None:
    verdicts = _Verdicts(("ALIVE", "n1"))
    assert _lost(verdicts, alive={"n1"}, wait_s=0.0) is True


def test_an_exception_in_the_loop_is_not_a_lost_node() -> None:
    verdicts = _Verdicts(("DEAD", "n1"))
    assert restarts.node_lost(ValueError("bug"), verdicts, lambda: set()) is False
    assert verdicts.asked == 0


# --------------------------------------------------------------------- retry or fail at once
def _lost_if_unanswered(err: BaseException) -> bool:
    return isinstance(err, WorkerHealthCheckFailedError)


def test_a_lost_node_restarts_even_when_other_ranks_failed_in_their_collectives() -> None:
    errors = {0: RuntimeError("collective aborted"), 1: _unanswered()}
    assert restarts.must_fail(errors, lost=_lost_if_unanswered) is None


def test_bad_input_fails_at_once_and_is_the_error_raised() -> None:
    bad = ConfigError("--weights x.keras: no layer matches")
    errors = {0: RuntimeError("collective aborted"), 1: bad}
    assert restarts.must_fail(errors, lost=_lost_if_unanswered) is bad


def test_a_bug_fails_at_once() -> None:
    bug = TypeError("unsupported operand")
    assert restarts.must_fail({0: bug}, lost=_lost_if_unanswered) is bug


def test_only_retryable_medray_errors_are_retried() -> None:
    assert restarts.must_fail({0: InfraError("S3 timed out"), 1: InfraError("again")},
                              lost=_lost_if_unanswered) is None


def test_a_crash_on_a_live_node_fails_at_once() -> None:
    crash = _unanswered()
    assert restarts.must_fail({0: crash}, lost=lambda _: False) is crash


def test_the_callback_raises_the_bad_input_on_the_controller() -> None:
    bad = InputError("labels do not match")
    with pytest.raises(InputError) as raised:
        restarts.FailFast().after_exception(None, {0: bad})
    assert raised.value is bad
    # a drained node: Ray Train restarts the group (nothing raised)
    assert restarts.FailFast().after_exception(None, {0: _unanswered(preempted=True)}) is None


def test_medray_errors_come_out_of_ray_trains_wrappers() -> None:
    bad = InputError("bad")
    in_user = UserExceptionWithTraceback(bad, traceback_str="Traceback ...")
    assert restarts.medray_error(WorkerGroupError("failed", {0: in_user})) is bad
    assert restarts.medray_error(ControllerError(bad)) is bad
    assert restarts.medray_error(ControllerError(RuntimeError("x"))) is None


def test_failure_config_bounds_both_kinds_of_retry() -> None:
    cfg = restarts.failure_config()
    assert cfg.max_failures == restarts.MAX_FAILURES == cfg.max_preemption_failures
    assert restarts.MAX_FAILURES > 0


# ------------------------------------------------------------------------- the attempts record
def test_attempts_are_recorded_and_summarised(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    nodes = iter(["n1", "n2"])
    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(get_node_id=lambda n=next(nodes): n,
                                                get_node_labels=lambda: {}))
    lake = Lake(str(tmp_path / "lake"))
    args = ("m", "t1", "job1", 0)
    first = restarts.begin_attempt(lake, *args, 0, world=1)
    assert restarts.summary(lake, "m", "t1", "job1") == {
        "restarts": 0, "resumed_from_epochs": [], "nodes": ["n1"]}
    # the first attempt trained epochs 1 and 2, checkpointed epoch 1 only, then lost its node
    first["epochs"].update({"1": {"steps": 4}, "2": {"steps": 4}})
    lake.write_json(layout.training_rank(*args), first)
    second = restarts.begin_attempt(lake, *args, 1, world=1)
    assert second["epochs"] == {"1": {"steps": 4}}  # epoch 2 is trained again
    assert [a["resumed_from_epoch"] for a in second["attempts"]] == [0, 1]
    assert lake.read_json(layout.training_rank(*args)) == second
    assert restarts.summary(lake, "m", "t1", "job1") == {
        "restarts": 1, "resumed_from_epochs": [1], "nodes": ["n1", "n2"]}
    # another job of the same training keeps its own record
    assert restarts.summary(lake, "m", "t1", "job2")["restarts"] == 0


def test_a_training_in_the_driver_trains_again_only_after_trouble_that_may_pass():
    """The driver's own loop (one CPU worker, cluster/train/in_driver.py) keeps what Ray
    Train's controller did: a retryable error trains again from the last checkpoint, up to
    MAX_FAILURES times; bad input, a bug, or one retry too many fail at once."""
    from medray.cluster.train import in_driver

    def runs(errors: list[BaseException]) -> tuple[list[int], BaseException | None]:
        calls: list[int] = []

        def run() -> None:
            calls.append(1)
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]

        try:
            in_driver.fit(run, lambda exc: exc)
        except Exception as exc:  # noqa: BLE001 - the test reads what came out
            return calls, exc
        return calls, None

    calls, raised = runs([InfraError("s3 slow"), InfraError("s3 slow")])
    assert (len(calls), raised) == (3, None)
    too_many = [InfraError(f"s3 down {i}") for i in range(restarts.MAX_FAILURES + 1)]
    calls, raised = runs(too_many)
    assert len(calls) == restarts.MAX_FAILURES + 1 and raised is too_many[-1]
    bad = InputError("no such label")
    assert runs([bad]) == ([1], bad)
    bug = ZeroDivisionError("a bug")
    assert runs([bug]) == ([1], bug)
