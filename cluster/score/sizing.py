"""The scorer pool's size when the user gave no tuning flags: actors, CPUs (TensorFlow threads)
per actor and batch size, from the cluster the job lands on.

The rule, measured on 2 cores (BENCHMARKS.md, docs/scoring.md): TensorFlow spreads one batch
over all the threads it is given almost as well as several processes would, with one model
copy and one set of buffers instead of several. So a CPU run gets one actor per node that has
CPUs free, holding all of that node's free CPUs (the smallest such node sets the count, as
Ray Data's pool asks the same of every actor); a GPU run gets one actor per GPU it can have
(on an autoscaling cluster, the GPUs the autoscaler can add). The batch is 256 rows, fewer when
a batch's working set would not fit a quarter of the memory free per actor. A flag the
user gave always wins; only the unset ones are chosen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from medray.workers.specs import ScoreSpec

log = logging.getLogger(__name__)
BATCH = 256
MIN_BATCH = 16
# float32 inputs plus the model's activations, per input byte (measured order of magnitude
# for MobileNetV2/DenseNet at 128-224 px: a batch's working set is 10-30x its float inputs)
_WORKING_SET_PER_INPUT_BYTE = 32
_MEMORY_SHARE = 4  # a batch may use a quarter of the memory free per actor


@dataclass(frozen=True)
class NodeFree:
    """What one alive node has free now."""

    cpus: float
    memory_bytes: float


@dataclass(frozen=True)
class Sizing:
    actors: int
    cpus_per_actor: float
    threads: int | None  # TensorFlow's threads per actor; None: TensorFlow's own choice (GPU)
    batch_size: int
    chosen: tuple[str, ...]  # the fields chosen here (the others were given)

    @classmethod
    def given(cls, spec: ScoreSpec, gpus: float) -> Sizing:
        """The spec's own values, every field as given (or its default)."""
        return cls(actors=spec.actors, cpus_per_actor=spec.cpus_per_actor,
                   threads=None if gpus else max(1, round(spec.cpus_per_actor)),
                   batch_size=spec.batch_size, chosen=())

    def as_dict(self) -> dict[str, Any]:
        return {"actors": self.actors, "cpus_per_actor": self.cpus_per_actor,
                "threads": self.threads, "batch_size": self.batch_size,
                "chosen": list(self.chosen)}


def choose(spec: ScoreSpec, gpus: float, nodes: list[NodeFree], reachable_gpus: float,
           image_bytes: int) -> Sizing:
    """Actors, CPUs per actor, threads and batch for ``spec`` (``gpus`` per actor, 0 on CPU)
    on a cluster whose alive nodes have ``nodes`` free. Pure: no Ray."""
    given = spec.model_fields_set
    chosen: list[str] = []
    usable = [n for n in nodes if n.cpus >= 1]
    cpus = spec.cpus_per_actor
    if "cpus_per_actor" not in given and not gpus and usable:
        cpus = float(max(1, int(min(n.cpus for n in usable))))
        chosen.append("cpus_per_actor")
    actors = spec.actors
    if "actors" not in given:
        if gpus:
            actors = max(1, int(reachable_gpus // gpus))
        else:
            actors = max(1, sum(int(n.cpus // cpus) for n in usable))
        chosen.append("actors")
    batch = spec.batch_size
    if "batch_size" not in given:
        free = min((n.memory_bytes for n in usable), default=0.0) or \
            min((n.memory_bytes for n in nodes), default=0.0)
        per_actor = free / max(1, actors) if not gpus else free
        batch = BATCH
        if per_actor and image_bytes:
            budget = per_actor / _MEMORY_SHARE
            while batch > MIN_BATCH and batch * image_bytes * 4 * _WORKING_SET_PER_INPUT_BYTE \
                    > budget:
                batch //= 2
        chosen.append("batch_size")
    # a CPU actor keeps TensorFlow to the CPUs Ray gave it; a GPU actor's threads feed the GPU
    threads = None if gpus else max(1, round(cpus))
    return Sizing(actors=actors, cpus_per_actor=cpus, threads=threads, batch_size=batch,
                  chosen=tuple(chosen))


def free_nodes() -> list[NodeFree]:
    """CPUs and memory free on each alive node now (Ray's per-node available resources)."""
    from ray._private.state import available_resources_per_node  # a Ray DeveloperAPI

    try:
        free = available_resources_per_node()
    except Exception as exc:  # noqa: BLE001 - sizing falls back to the spec's own values
        log.warning("cannot read the nodes' free resources (%s): using the flags' defaults", exc)
        return []
    return [NodeFree(cpus=float(res.get("CPU", 0.0)), memory_bytes=float(res.get("memory", 0.0)))
            for res in free.values()]
