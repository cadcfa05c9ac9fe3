"""The local autoscaling config (configs/cluster/autoscale-local.yaml) stays in step with
configs/cluster/aws.yaml, and what medray hands Ray's autoscaler passes Ray's own schema."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from medray.cluster.infra import autoscale, env
from medray.workers.errors import ConfigError
from tests.support.configs import AWS, CLUSTER

LOCAL = CLUSTER / "autoscale-local.yaml"


def _load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def _market(aws_type: dict[str, Any]) -> str | None:
    """spot / on-demand of a GPU or CPU worker type in aws.yaml; None for the head."""
    options = aws_type.get("node_config", {}).get("InstanceMarketOptions") or {}
    return str(options.get("MarketType", "on-demand"))


def test_same_node_types_and_head() -> None:
    aws, local = _load(AWS), _load(LOCAL)
    assert set(local["available_node_types"]) == set(aws["available_node_types"])
    assert local["head_node_type"] == aws["head_node_type"]


@pytest.mark.parametrize("name", sorted(_load(AWS)["available_node_types"]))
def test_each_node_type_mirrors_aws(name: str) -> None:
    aws_type = _load(AWS)["available_node_types"][name]
    local_type = _load(LOCAL)["available_node_types"][name]
    aws_res, local_res = aws_type["resources"], local_type["resources"]
    # the same kinds of resource, present or absent alike (a GPU type asks GPU: 1 in both)
    assert {k for k, v in aws_res.items() if v} == {k for k, v in local_res.items() if v}
    assert aws_res.get("GPU", 0) == local_res.get("GPU", 0)
    # scaled to a laptop: one CPU per fake node (each is a raylet on the same cores)
    assert local_res["CPU"] == 1
    if name == _load(AWS)["head_node_type"]:
        return
    assert local_type.get("min_workers", 0) == aws_type.get("min_workers", 0)
    assert 1 <= local_type["max_workers"] <= aws_type["max_workers"]
    assert local_type.get("priority") == aws_type.get("priority")
    assert local_type["labels"]["market"] == _market(aws_type)


def test_ray_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import validate_config

    cfg = autoscale.load(LOCAL)
    ray_cfg = autoscale.ray_config(cfg, "127.0.0.1:6380")
    validate_config(copy.deepcopy(ray_cfg))  # raises on a config Ray's autoscaler would refuse
    types = ray_cfg["available_node_types"]
    assert ray_cfg["head_node_type"] == autoscale.RAY_HEAD_TYPE in types
    assert types["gpu_spot"]["labels"][autoscale.NODE_TYPE_LABEL] == "gpu_spot"
    assert types["gpu_spot"]["resources"] == {"CPU": 1, "GPU": 1}


def test_max_resources_counts_every_worker_at_its_max() -> None:
    most = autoscale.max_resources(autoscale.load(LOCAL))
    # head 1 CPU + gpu_spot 2 x (1 CPU, 1 GPU) + gpu_ondemand 1 x (1, 1) + cpu_spot 1 x 1 CPU
    assert most == {"CPU": 5.0, "GPU": 3.0}


def test_cloud_config_is_refused() -> None:
    with pytest.raises(ConfigError, match="provider.type must be 'fake_multinode'"):
        autoscale.load(AWS)


def test_reachable_resources_takes_the_autoscalers_most(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.AUTOSCALE_MAX_RESOURCES, '{"CPU": 5, "GPU": 3}')
    assert autoscale.reachable_resources({"CPU": 1.0}) == {"CPU": 5.0, "GPU": 3.0}
    monkeypatch.delenv(env.AUTOSCALE_MAX_RESOURCES)
    assert autoscale.reachable_resources({"CPU": 1.0}) == {"CPU": 1.0}
