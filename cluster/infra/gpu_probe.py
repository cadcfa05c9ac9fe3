"""What TensorFlow sees on each node of the cluster: the small Ray job `medray doctor` submits.

Run as ``python -m medray.cluster.infra.gpu_probe`` by the Jobs API. One task is pinned to every
alive node (no CPU asked, so a busy node still answers); it imports TensorFlow with the node's
whole device list visible and counts the GPUs it finds. The job prints one wire result line:
``{"nodes": [{"node_id", "node", "ray_gpus", "tf_gpus", "cuda_build", "error"}, ...]}``, which
``doctor.tensorflow_gpu_check`` compares with the GPUs Ray schedules there.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from medray.cluster.infra import env, wire

TASK_TIMEOUT_S = 150.0


def tensorflow_view() -> dict[str, Any]:
    """TensorFlow's GPUs on this node, with every device visible (a task that asks for no
    GPU gets an empty CUDA_VISIBLE_DEVICES from Ray, which would hide them all)."""
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ.setdefault(env.TF_CPP_MIN_LOG_LEVEL, "3")
    try:
        import tensorflow as tf

        return {"tf_gpus": len(tf.config.list_physical_devices("GPU")),
                "cuda_build": bool(tf.test.is_built_with_cuda()), "error": None}
    except Exception as exc:  # noqa: BLE001 - reported per node, never a failed probe
        return {"tf_gpus": None, "cuda_build": None, "error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address="auto", logging_level=logging.ERROR, log_to_driver=False)
    probe = ray.remote(num_cpus=0, max_retries=0)(tensorflow_view)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id=n["NodeID"], soft=False)).remote() for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=TASK_TIMEOUT_S)
    rows = []
    for node, ref in zip(nodes, refs, strict=True):
        seen = ray.get(ref) if ref in ready else {
            "tf_gpus": None, "cuda_build": None,
            "error": f"no answer within {TASK_TIMEOUT_S:g}s"}
        rows.append({"node_id": node["NodeID"], "node": node.get("NodeManagerAddress", "?"),
                     "ray_gpus": float(node.get("Resources", {}).get("GPU", 0)), **seen})
    print(wire.result_line({"nodes": rows}), flush=True)  # noqa: T201 - the wire to the CLI


if __name__ == "__main__":
    main()
