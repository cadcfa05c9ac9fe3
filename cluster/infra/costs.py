"""What a job used and what it cost: wall time, CPU- and GPU-seconds per node type.

Usage comes from Ray's state API for the job's tasks and actors: a task holds its resources
from start to end; an actor holds them from its creation until its last method call ends (on a
lost node: until its last call there ended or failed). An actor in a placement group (a Ray
Train worker) asks for its bundle's resources, which Ray names per group (``GPU_group_<pg>``):
they count as the plain resource they reserve.
Prices (per node type, per CPU-hour and GPU-hour) come from a YAML table named by
``MEDRAY_PRICES`` (see configs/cluster/prices.yaml); without one, cost is left out, never guessed.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medray.cluster.infra import env
from medray.cluster.infra.ray_local import NODE_TYPE_LABEL

log = logging.getLogger(__name__)
# Ray names a placement group's resources twice: ``CPU_group_<pg id>`` for the group and
# ``CPU_group_<bundle>_<pg id>`` for the bundle, each with the same amount; one is counted
_GROUP_RESOURCE = re.compile(r"^(?P<name>.+)_group_(?P<bundle>\d+_)?[0-9a-f]+$")
# The first pause while task events lag, and how each next one grows (bounded in total by
# job_usage's ``settle_tries`` seconds): events land about a second after a call ends
SETTLE_FIRST_S = 0.1
SETTLE_GROWTH = 1.3


def plain_resources(res: Mapping[str, float]) -> dict[str, float]:
    """``res`` with placement-group resources under the plain names they reserve."""
    out: dict[str, float] = defaultdict(float)
    for key, amount in res.items():
        group = _GROUP_RESOURCE.match(key)
        if group is None:
            out[key] += amount
        elif not group["bundle"]:
            out[group["name"]] += amount
    return dict(out)


def load_prices(path: str | None = None) -> dict[str, dict[str, float]] | None:
    import yaml

    path = path or env.get(env.PRICES)
    if not path or not Path(path).exists():
        return None
    doc = yaml.safe_load(Path(path).read_text()) or {}
    return {
        str(k): {kk: float(vv) for kk, vv in (v or {}).items()}
        for k, v in (doc.get("node_types") or {}).items()
    }


def prices_from_env() -> dict[str, dict[str, float]] | None:
    """The price table a job received from the CLI (``MEDRAY_PRICES_JSON``), or None."""
    import json

    prices = json.loads(env.get(env.PRICES_JSON) or "null")
    return prices or None


def labelled_type(labels: Mapping[str, Any]) -> str | None:
    """A node's type from its labels (a cloud launcher's, KubeRay's or the local
    autoscaler's); None on a node started by hand."""
    found = (labels.get("ray.io/node-type") or labels.get("ray.io/node-group")
             or labels.get(NODE_TYPE_LABEL))
    return str(found) if found else None


def _node_types() -> dict[str, str]:
    from ray.util.state import list_nodes

    types = {}
    # dead nodes are listed too: a preempted node's time stays under its type
    for node in list_nodes(detail=True, limit=10_000):
        labels = node.labels or {}
        types[node.node_id] = labelled_type(labels) or ("head" if node.is_head_node
                                                        else "worker")
    return types


def _settled(tasks: list[Any]) -> bool:
    """True when every actor that ran a call has a node and every started task has ended."""
    placed = {t.actor_id for t in tasks if t.actor_id and t.node_id
              and not str(t.type).endswith("ACTOR_CREATION_TASK")}
    called = {t.actor_id for t in tasks if t.actor_id
              and str(t.type).endswith("ACTOR_TASK")}
    return called <= placed and all(t.end_time_ms for t in tasks
                                    if t.start_time_ms and not t.actor_id)


def settle_waits(bound_s: float, first_s: float = SETTLE_FIRST_S,
                 growth: float = SETTLE_GROWTH) -> list[float]:
    """The pauses between listings while task events lag: short at first, growing, and
    together exactly ``bound_s`` (the last one trimmed), so a job whose events arrive soon
    pays a fraction of a second and one whose events lag still waits the whole bound."""
    waits: list[float] = []
    left, step = bound_s, first_s
    while left > 1e-9:
        waits.append(round(min(step, left), 6))
        left -= waits[-1]
        step *= growth
    return waits


def job_usage(wall_s: float, settle_tries: int = 3,
              driver_held: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CPU/GPU-seconds of the current Ray job by node type (best effort: {} on failure).

    ``settle_tries``: the seconds (one per try of the earlier fixed one-second pauses) to go on
    listing while task events lag, in pauses that start at ``SETTLE_FIRST_S`` and grow; 0 for
    a job that is being stopped and has seconds left. ``driver_held``: CPUs the job's driver
    held itself, as ``{"node_id", "cpus", "seconds"}`` (a one-worker CPU training runs in its
    driver, on CPUs it holds with a placement group: cluster/train/in_driver.py)."""
    try:
        import ray
        from ray.util.state import list_actors, list_tasks

        job_hex = ray.get_runtime_context().get_job_id()
        # Workers report task events about once a second: list again while the last calls of
        # an actor still lack their node or end time. Pausing a whole second each time cost
        # every job's end about a second; short growing pauses end soon after the events land.
        waits = settle_waits(float(settle_tries))
        for attempt in range(len(waits) + 1):
            tasks = list_tasks(
                filters=[("job_id", "=", job_hex)],
                detail=True,
                limit=10_000,
                raise_on_missing_output=False,
            )
            if attempt == len(waits) or _settled(tasks):
                break
            time.sleep(waits[attempt])
        # Where each actor runs comes from the GCS actor table, which has no reporting lag.
        actors = list_actors(filters=[("job_id", "=", job_hex)], detail=True, limit=10_000,
                             raise_on_missing_output=False)
        node_type = _node_types()
    except Exception as exc:  # noqa: BLE001 - accounting must never fail a job
        log.warning("could not read resource usage: %s", exc)
        return {"wall_seconds": round(wall_s, 2)}
    per_type: dict[str, dict[str, float]] = defaultdict(
        lambda: {"cpu_seconds": 0.0, "gpu_seconds": 0.0}
    )
    per_node: dict[str, dict[str, float]] = defaultdict(
        lambda: {"cpu_seconds": 0.0, "gpu_seconds": 0.0}
    )

    def held(node: str, res: dict[str, float], ms: float) -> None:
        res = plain_resources(res)
        for bucket in (per_type[node_type.get(node, "unknown")], per_node[node]):
            bucket["cpu_seconds"] += res.get("CPU", 0.0) * ms / 1000
            bucket["gpu_seconds"] += res.get("GPU", 0.0) * ms / 1000

    # An actor's creation task carries its resources but no node; its method calls carry the
    # node. It holds the resources from creation until its last call ends, on each node it ran
    # on: an actor restarted elsewhere (its node lost) pays for its time on both nodes.
    actor_span: dict[tuple[str, str], list[float]] = {}
    actor_created: dict[str, tuple[float, float]] = {}
    actor_res: dict[str, dict[str, float]] = {}
    actor_node: dict[str, str] = {}
    actor_class: dict[str, str] = {}
    for t in tasks:
        start, end = t.start_time_ms, t.end_time_ms
        kind = str(t.type)
        if t.actor_id and "ACTOR" in kind:
            actor_class[t.actor_id] = str(t.func_or_class_name).rsplit(".", 1)[0]
            if kind.endswith("ACTOR_CREATION_TASK"):
                actor_res[t.actor_id] = t.required_resources or {}
                # the first attempt: a restarted actor's creation runs again on its new node
                if start and start < actor_created.get(t.actor_id, (start + 1, 0))[0]:
                    actor_created[t.actor_id] = (start, end or start)
            if t.node_id:
                actor_node.setdefault(t.actor_id, t.node_id)
            # A call that failed with its node carries only its end: its owner reported the
            # failure, as when the node was lost before the actor's worker reported any call
            # (workers report about once a second). The actor was there until that end.
            seen = start or end
            if seen and t.node_id:
                span = actor_span.setdefault((t.actor_id, t.node_id), [seen, end or seen])
                span[0] = min(span[0], seen)
                span[1] = max(span[1], end or seen)
        elif start and end:
            held(t.node_id or "", t.required_resources or {}, end - start)
    for a in actors:
        if a.node_id:
            actor_node[a.actor_id] = a.node_id
        actor_class.setdefault(a.actor_id, str(a.repr_name or a.class_name))
    placement: dict[str, set[str]] = defaultdict(set)
    for actor_id, node in actor_node.items():
        placement[actor_class.get(actor_id, "?")].add(node)
    for actor_id, node in actor_node.items():  # an actor whose calls carry no node yet
        if not any(a == actor_id for a, _ in actor_span) and actor_id in actor_created:
            actor_span[(actor_id, node)] = list(actor_created[actor_id])
    first_node: dict[str, tuple[str, float]] = {}
    for (actor_id, node), (first, _) in actor_span.items():
        if actor_id not in first_node or first < first_node[actor_id][1]:
            first_node[actor_id] = (node, first)
    for (actor_id, node), (first, last) in actor_span.items():
        if first_node[actor_id][0] == node:  # the first node held it from its creation
            first = min(first, actor_created.get(actor_id, (first, first))[0])
        held(node, actor_res.get(actor_id, {}), last - first)
    ran_on = {t.node_id for t in tasks if t.node_id}
    if driver_held:
        driver_node = str(driver_held["node_id"])
        ran_on.add(driver_node)
        held(driver_node, {"CPU": float(driver_held["cpus"])},
             float(driver_held["seconds"]) * 1000)
    return {
        "wall_seconds": round(wall_s, 2),
        "cpu_seconds": round(sum(v["cpu_seconds"] for v in per_type.values()), 2),
        "gpu_seconds": round(sum(v["gpu_seconds"] for v in per_type.values()), 2),
        "by_node_type": {
            k: {kk: round(vv, 2) for kk, vv in v.items()} for k, v in per_type.items()
        },
        # per node, dead ones included: a node lost mid-job keeps the time it was used
        "by_node": {k: {"node_type": node_type.get(k, "unknown"),
                        **{kk: round(vv, 2) for kk, vv in v.items()}}
                    for k, v in per_node.items() if k},
        # the node types the job's tasks and actors (and a driver that did the work) ran on
        "node_types": sorted({node_type.get(n, "unknown") for n in ran_on}),
        # which nodes each kind of actor ran on: shows a job spread over the cluster
        "actor_nodes": {k: len(v) for k, v in sorted(placement.items())},
    }


def cost(
    usage: dict[str, Any], prices: dict[str, dict[str, float]] | None, images: int | None
) -> dict[str, Any] | None:
    """Cost of a job from its usage and a price table; per 1,000 images when images are known."""
    if not prices or "by_node_type" not in usage:
        return None
    total = 0.0
    for ntype, used in usage["by_node_type"].items():
        price = prices.get(ntype) or prices.get("default") or {}
        total += used["cpu_seconds"] / 3600 * price.get("cpu_hour", 0.0)
        total += used["gpu_seconds"] / 3600 * price.get("gpu_hour", 0.0)
    # nine decimals: a small job's total is a fraction of a cent, and sums of totals (a run
    # scored by several jobs) must not drift from the per-1,000 figure of each job
    out: dict[str, Any] = {"total": round(total, 9), "currency": "USD"}
    if images:
        out["per_1000_images"] = round(total / images * 1000, 6)
    return out
