"""Restarting a training's workers after a failure: which failures, how many, and the record.

Ray Train restarts the whole worker group when a worker fails, up to ``FailureConfig``'s
limits; every new worker group restores the last checkpoint in the lake
(``remote.train_loop``), so a restart costs the epoch in progress and the start-up, never the
epochs already committed. medray lets Ray Train retry only what a retry can mend:

- a worker whose node was lost (the node's raylet gone, as when spot capacity disappears), or
  whose node Ray's autoscaler drained for preemption (Ray Train waits those out itself and
  counts them apart, in ``max_preemption_failures``);
- a retryable medray error (``InfraError``: storage or cluster trouble that may pass).

Anything else fails the job at once, through ``FailFast``, a Ray Train callback that runs on
the controller and raises the worker's error there (the controller then stops for good): bad
input or config (``InputError``) is wrong on every try, a Python error in the loop is a bug,
and a worker that died on a node that is still up (a crash, an OOM kill) would die again at the
same place, from the same checkpoint, on the same data. ``--resume`` continues such a training
once the cause is fixed.

Each worker keeps a record of the attempts it began in its rank file (``layout.training_rank``):
the epoch it resumed from, its node and process. Rank 0's record says how often the job's
worker group restarted, and from which epochs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from ray.train.v2.api.callback import UserCallback

from medray.cluster.infra.costs import labelled_type
from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.workers.errors import MedrayError

log = logging.getLogger(__name__)

# Restarts of one job's worker group. A restart costs at most one epoch and a worker group's
# start-up; a job that lost three nodes is running where the capacity is not there (spot
# reclaims come hours apart on a healthy market), so the fourth loss fails it, and `--resume`
# continues it later from the same checkpoint, instead of restarting without end.
MAX_FAILURES = 3
# How long to wait for Ray to say whether a worker that stopped answering is dead, and why: a
# lost node is declared dead after its missed health checks (about 15-30 s with Ray's
# defaults); a worker that crashed on a live node is reported dead at once.
VERDICT_WAIT_S = 60.0
_VERDICT_EVERY_S = 1.0
# the attributes under which Ray Train wraps a worker's error (user code, health checks,
# the controller, the worker group)
_WRAPPERS = ("_base_exc", "health_check_failure", "controller_failure", "cause", "__cause__")


def failure_config() -> Any:
    """Ray Train's FailureConfig for a training: bounded retries, of both kinds."""
    from ray.train.v2.api.config import FailureConfig

    # Ray's default for preemptions is unlimited: a drained node is planned, but a market
    # that drains every node it gives is no better than one that kills them
    return FailureConfig(max_failures=MAX_FAILURES, max_preemption_failures=MAX_FAILURES)


def _nested(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every error wrapped inside it, outermost first."""
    seen: list[BaseException] = [error]
    ids: set[int] = set()
    while seen:
        err = seen.pop(0)
        if id(err) in ids:
            continue
        ids.add(id(err))
        yield err
        seen.extend(e for e in getattr(err, "worker_failures", {}).values()
                    if isinstance(e, BaseException))
        for attr in _WRAPPERS:
            inner = getattr(err, attr, None)
            if isinstance(inner, BaseException):
                seen.append(inner)


def medray_error(error: BaseException) -> MedrayError | None:
    """The medray error a worker raised, out of Ray Train's wrappers; None if there is none."""
    return next((e for e in _nested(error) if isinstance(e, MedrayError)), None)


def _actor_error(error: BaseException) -> Any:
    """The RayActorError inside a worker's error (its process or node gone), or None."""
    from ray.exceptions import RayActorError

    return next((e for e in _nested(error) if isinstance(e, RayActorError)), None)


def _actor_verdict(actor_id: str) -> tuple[str, str | None]:
    """(the actor's state, its node id) as Ray's state API has them now."""
    from ray.util.state import get_actor

    actor = get_actor(actor_id, timeout=10)
    if actor is None:
        return "UNKNOWN", None
    return str(actor.state), actor.node_id


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


Verdict = Callable[[str], tuple[str, str | None]]  # actor id -> (its state, its node id)


def node_lost(error: BaseException, verdict: Verdict = _actor_verdict,
              alive: Callable[[], set[str]] = _alive_nodes, wait_s: float = VERDICT_WAIT_S,
              every_s: float = _VERDICT_EVERY_S) -> bool:
    """Whether ``error`` says the worker's node went away (lost or drained).

    A worker on a lost node first shows as unavailable and is declared dead only when Ray
    gives up on its node; a crashed worker is dead at once, on a node that is alive. So wait
    (up to ``wait_s``) until Ray declares the actor dead, then ask whether its node lives.
    Undecided at the end (the state API silent, or slow), the loss is assumed: the restart
    counts against ``MAX_FAILURES`` and cannot loop."""
    died = _actor_error(error)
    if died is None:
        return False
    if died.preempted:
        return True
    if not died.actor_id:
        return True
    deadline = time.monotonic() + wait_s
    while True:
        try:
            state, node = verdict(died.actor_id)
            if state == "DEAD" and node:
                return node not in alive()
        except Exception as exc:  # noqa: BLE001 - undecided: the state API is best effort
            log.warning("could not ask Ray about worker actor %s: %s", died.actor_id, exc)
        if time.monotonic() >= deadline:
            return True
        time.sleep(every_s)


def must_fail(worker_errors: dict[int, BaseException],
              lost: Callable[[BaseException], bool] = node_lost) -> BaseException | None:
    """The error to fail the training with at once, or None to let Ray Train restart it.

    A lost node wins over every other error: when one worker goes, the others fail in their
    collectives. Otherwise only retryable medray errors are retried; a non-retryable medray
    error is preferred as the one to raise (its exit code says bad input)."""
    if any(lost(err) for err in worker_errors.values()):
        return None
    fatal = [(rank, err) for rank, err in sorted(worker_errors.items())
             if not ((m := medray_error(err)) is not None and m.retryable)]
    if not fatal:
        return None
    for _, err in fatal:
        found = medray_error(err)
        if found is not None:
            return found
    return fatal[0][1]


class FailFast(UserCallback):
    """On Ray Train's controller: lets a lost node's worker group restart, and stops the
    training at once on any other failure (raising here makes the controller's error final)."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        fatal = must_fail(dict(worker_exceptions))
        if fatal is not None:
            log.error("training workers failed (%s): not retried",
                      ", ".join(f"rank {r}: {type(e).__name__}"
                                for r, e in sorted(worker_exceptions.items())))
            raise fatal
        log.warning("a training worker's node was lost: restarting the workers from the last "
                    "checkpoint (ranks %s)", sorted(worker_exceptions))


# ------------------------------------------------------------------------ the attempts record
def begin_attempt(lake: Lake, model: str, train_id: str, job_id: str, rank: int,
                  resumed_from: int, **facts: Any) -> dict[str, Any]:
    """The rank's record for this job with one more attempt, resumed from epoch
    ``resumed_from`` (written at once, so a worker lost later still counts), and ``facts``
    (world size, batch plan); the epochs of earlier attempts after that checkpoint are dropped,
    as they are trained again."""
    import ray

    ctx = ray.get_runtime_context()
    path = layout.training_rank(model, train_id, job_id, rank)
    record: dict[str, Any] = dict(lake.read_json_or_none(path) or {})
    record["epochs"] = {k: v for k, v in (record.get("epochs") or {}).items()
                        if int(k) <= resumed_from}
    record["attempts"] = [*record.get("attempts", []), {
        "resumed_from_epoch": resumed_from,
        "node_id": ctx.get_node_id(), "node_type": labelled_type(ctx.get_node_labels() or {}),
        "pid": os.getpid(),
        "started_at": datetime.now(UTC).isoformat()}]
    record.update(rank=rank, **facts)
    lake.write_json(path, record)
    return record


def summary(lake: Lake, model: str, train_id: str, job_id: str) -> dict[str, Any]:
    """How often this job's worker group restarted and from which epochs (rank 0's record)."""
    record = lake.read_json_or_none(layout.training_rank(model, train_id, job_id, 0)) or {}
    attempts = record.get("attempts") or []
    return {"restarts": max(0, len(attempts) - 1),
            "resumed_from_epochs": [int(a["resumed_from_epoch"]) for a in attempts[1:]],
            "nodes": [a.get("node_id") for a in attempts]}
