"""The scorer pool's default size (cluster/score/sizing.py): chosen from the cluster only for
the flags the user left out."""

from __future__ import annotations

from medray.cluster.score.sizing import BATCH, MIN_BATCH, NodeFree, choose
from medray.workers.specs import ScoreSpec

GIB = 2**30
LAPTOP = [NodeFree(cpus=2, memory_bytes=8 * GIB)]
SMALL_IMAGE = 128 * 128  # gray 128 px


def _spec(**given: object) -> ScoreSpec:
    return ScoreSpec(dataset="d", model="m", **given)


def test_one_actor_holding_every_free_cpu_of_a_laptop() -> None:
    size = choose(_spec(), 0.0, LAPTOP, 0.0, SMALL_IMAGE)
    assert (size.actors, size.cpus_per_actor, size.threads, size.batch_size) == (1, 2.0, 2, BATCH)
    assert set(size.chosen) == {"actors", "cpus_per_actor", "batch_size"}


def test_one_actor_per_node_sized_by_the_smallest_node() -> None:
    nodes = [NodeFree(cpus=4, memory_bytes=16 * GIB), NodeFree(cpus=2, memory_bytes=16 * GIB),
             NodeFree(cpus=0.5, memory_bytes=16 * GIB)]  # a node without a whole CPU free
    size = choose(_spec(), 0.0, nodes, 0.0, SMALL_IMAGE)
    assert (size.cpus_per_actor, size.actors) == (2.0, 3)  # 4 CPUs hold two 2-CPU actors


def test_flags_given_are_kept() -> None:
    size = choose(_spec(actors=3, cpus_per_actor=0.5, batch_size=16), 0.0, LAPTOP, 0.0,
                  SMALL_IMAGE)
    assert (size.actors, size.cpus_per_actor, size.threads, size.batch_size) == (3, 0.5, 1, 16)
    assert size.chosen == ()


def test_gpu_run_gets_an_actor_per_reachable_gpu() -> None:
    size = choose(_spec(gpus_per_actor=1), 1.0, [NodeFree(cpus=1, memory_bytes=8 * GIB)], 3.0,
                  SMALL_IMAGE)
    assert (size.actors, size.threads) == (3, None)


def test_batch_shrinks_to_fit_memory() -> None:
    big = 224 * 224 * 3
    roomy = choose(_spec(), 0.0, LAPTOP, 0.0, big).batch_size
    tight = choose(_spec(), 0.0, [NodeFree(cpus=2, memory_bytes=1 * GIB)], 0.0, big).batch_size
    assert MIN_BATCH <= tight < roomy <= BATCH
