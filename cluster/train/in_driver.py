"""Training in the job's driver: a one-worker CPU training runs its loop in the driver process
(Ray Train's local mode, ``num_workers=0``), on CPUs the driver holds on its own node.

Ray Train's other path starts two Python processes one after the other before the loop runs:
its controller, then its worker (about 6 s of a small job's 14 s of fixed start-up on 2 cores;
BENCHMARKS.md "Start-up"). A one-worker CPU training needs neither: no collectives, no GPU to
place. The driver runs on the head (every medray job's driver does), so it asks Ray for the
worker's CPUs there, as a placement group pinned to its node by Ray's ``ray.io/node-id`` label:
the job waits for them as Ray Train's worker would, other jobs see them taken, and the job's
usage counts them. A node with fewer CPUs than the worker asks (a cloud head that advertises
none) trains on Ray Train's worker, placed wherever the cluster has the CPUs.

What Ray Train's controller did besides that, done here: a retryable medray error (storage
trouble that may pass) trains again from the last checkpoint, up to ``restarts.MAX_FAILURES``
times; anything else fails the job at once, as ``restarts.FailFast`` does. A lost node is not
retried: the driver's node is the head, and the job goes with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from medray.cluster.train import restarts
from medray.cluster.train.plan import driver_cpus
from medray.workers.specs import TrainSpec

log = logging.getLogger(__name__)
WAIT_LOG_S = 30.0  # how often a job waiting for its CPUs says so


@dataclass
class Held:
    """CPUs held on the driver's node, and for how long (set when they are let go)."""

    cpus: float
    node_id: str
    seconds: float = 0.0

    def usage(self) -> dict[str, Any]:
        """What ``costs.job_usage`` counts beside the job's tasks and actors."""
        return {"node_id": self.node_id, "cpus": self.cpus, "seconds": round(self.seconds, 2)}


def _node_cpus(node_id: str) -> float:
    import ray

    return float(next((n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes()
                       if n.get("NodeID") == node_id and n.get("Alive")), 0.0))


@contextmanager
def hold(spec: TrainSpec) -> Iterator[Held | None]:
    """The worker's CPUs on this driver's node while the block runs, or None where the
    training goes to Ray Train (more workers, GPUs, or a node without that many CPUs)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    cpus = driver_cpus(spec)
    node_id = ray.get_runtime_context().get_node_id()
    if not cpus or _node_cpus(node_id) < cpus:
        yield None
        return
    group = placement_group([{"CPU": cpus}],
                            bundle_label_selector=[{"ray.io/node-id": node_id}])
    waited = time.monotonic()
    try:
        while True:
            ready, _ = ray.wait([group.ready()], timeout=WAIT_LOG_S)
            if ready:
                break
            log.info("waiting for %g CPU on this node for the training (held by other jobs for "
                     "%.0f s so far)", cpus, time.monotonic() - waited)
        held = Held(cpus, node_id)
        started = time.monotonic()
        try:
            yield held
        finally:
            held.seconds = time.monotonic() - started
    finally:
        remove_placement_group(group)


def fit(run: Callable[[], Any], unwrap: Callable[[BaseException], BaseException]) -> None:
    """``run`` (a local-mode ``trainer.fit``) again after a retryable error, from the last
    checkpoint (the loop restores it), up to ``restarts.MAX_FAILURES`` times."""
    for attempt in range(restarts.MAX_FAILURES + 1):
        try:
            run()
            return
        except Exception as exc:
            cause = unwrap(exc)
            if attempt == restarts.MAX_FAILURES or \
                    restarts.must_fail({0: cause}, lost=lambda _: False) is not None:
                raise
            log.warning("training failed (%s: %s); training again from the last checkpoint "
                        "(%d of %d)", type(cause).__name__, cause, attempt + 1,
                        restarts.MAX_FAILURES)
