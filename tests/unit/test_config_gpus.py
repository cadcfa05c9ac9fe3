"""GPUs in the cluster configs: worker groups that should have them request them, spot is
preferred with an on-demand fallback, and the reachable capacity covers the GPU jobs."""

from __future__ import annotations

from typing import Any

from tests.support.configs import (
    GPU_INSTANCE_FAMILY,
    OUR_IMAGE,
    aws,
    job_spec,
    kube_doc,
)


def test_aws_node_types() -> None:
    config = aws()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not GPU_INSTANCE_FAMILY.match(head["node_config"]["InstanceType"]), "CPU head"
    assert head["resources"].get("CPU", 0) > 0 and head["resources"].get("GPU", 0) == 0
    gpu_types = {}
    for name, node_type in types.items():
        node = node_type["node_config"]
        assert "IamInstanceProfile" in node, f"{name}: needs an instance profile for S3 (the lake)"
        if GPU_INSTANCE_FAMILY.match(node["InstanceType"]):
            gpu_types[name] = node_type
            assert node_type["resources"].get("GPU", 0) >= 1, f"{name} must advertise its GPU"
            options = node_type.get("docker", {}).get("worker_run_options", [])
            assert "--gpus all" in options, f"{name}: the container must see the GPU"
        else:
            assert node_type["resources"].get("GPU", 0) == 0, f"{name} has no GPU"
    assert all(t.get("min_workers", 0) == 0 for t in gpu_types.values()), "GPUs scale from 0"
    spot = {n for n, t in gpu_types.items() if "InstanceMarketOptions" in t["node_config"]}
    on_demand = set(gpu_types) - spot
    assert spot and on_demand, "a spot GPU type and an on-demand fallback are both expected"
    for name in spot:
        assert types[name]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert min(types[n].get("priority", 0) for n in spot) > max(
        types[n].get("priority", 0) for n in on_demand
    ), "spot must be preferred (autoscaler v2 priority) over the on-demand fallback"


def _gpu_limit(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_kuberay_gpu_worker_groups_request_gpus() -> None:
    cluster = kube_doc("RayCluster")["spec"]
    for container in cluster["headGroupSpec"]["template"]["spec"]["containers"]:
        assert _gpu_limit(container) == 0, "the head is a CPU pod"
    gpu_groups = 0
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            image = OUR_IMAGE.match(container["image"])
            assert image, f"{group['groupName']}: {container['image']} is not a medray image"
            flavor = image["flavor"]
            if flavor == "gpu":
                gpu_groups += 1
                assert _gpu_limit(container) >= 1, f"{group['groupName']}: GPU image, no GPU"
                requests = container["resources"].get("requests", {})
                assert int(requests.get("nvidia.com/gpu", _gpu_limit(container))) == _gpu_limit(
                    container
                ), "GPU requests must equal limits"
            else:
                assert _gpu_limit(container) == 0, f"{group['groupName']}: CPU image with a GPU"
    assert gpu_groups >= 1


def test_gpu_capacity_covers_the_jobs() -> None:
    score, train = job_spec("nightly-score.yaml"), job_spec("retrain-chexnet.yaml")
    needed = max(score.actors * score.gpus_per_actor, train.workers * train.gpus_per_worker)
    types = aws()["available_node_types"]
    aws_gpus = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    assert aws_gpus >= needed, f"aws.yaml can reach {aws_gpus} GPUs, the jobs need {needed}"
    kube_gpus = sum(
        g["maxReplicas"] * sum(_gpu_limit(c) for c in g["template"]["spec"]["containers"])
        for g in kube_doc("RayCluster")["spec"]["workerGroupSpecs"]
    )
    assert kube_gpus >= needed, f"the RayCluster can reach {kube_gpus} GPUs, jobs need {needed}"
