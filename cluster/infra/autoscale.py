"""A local cluster driven by Ray's own autoscaler, with Ray's fake multi-node provider.

`medray cluster up --autoscale configs/cluster/autoscale-local.yaml` starts the head of
``ray_local`` with ``--autoscaling-config``: Ray's monitor process then adds worker nodes (each a
raylet on this machine, labelled ``ray.io/node-group=<node type>``) when tasks and actors ask for
resources the cluster lacks, and removes them after the idle timeout, like cloud nodes. The
config has the shape of a Ray cluster launcher YAML whose node types mirror
``configs/cluster/aws.yaml``; this module checks it and writes the full config Ray's autoscaler
(v1, the one `ray start --head` runs) reads: Ray's ``AutoscalingCluster`` test helper cannot be
used, as it runs `ray stop --force`, which would stop every other Ray on the machine.

What the cluster can grow to (``max_resources``) is recorded in ``cluster.json`` and given to
the head's processes (``MEDRAY_AUTOSCALE_MAX_RESOURCES``), so a job asking for GPUs that no
node has yet is not refused while the autoscaler could add them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medray.cluster.infra import env, ray_local
from medray.cluster.infra.home import write_private
from medray.workers.errors import ConfigError

log = logging.getLogger(__name__)

PROVIDER = "fake_multinode"
# The node type of a node the autoscaler started. Ray's own label for it (ray.io/node-group,
# set by KubeRay and the cloud launchers) is not set by the fake provider, and a user label may
# not use the ray.io/ prefix.
NODE_TYPE_LABEL = ray_local.NODE_TYPE_LABEL
# The fake provider tags the head with this node type, whatever the config calls it.
RAY_HEAD_TYPE = "ray.head.default"
_TOP_KEYS = {"cluster_name", "max_workers", "upscaling_speed", "idle_timeout_minutes",
             "provider", "head_node_type", "available_node_types"}
_TYPE_KEYS = {"resources", "min_workers", "max_workers", "priority", "labels"}
# How often the autoscaler looks at demand, and how long a node may miss its reports before
# the autoscaler replaces it (Ray's defaults: 5 s, 30 s; a local node that vanished is gone).
_AUTOSCALER_ENV = {"AUTOSCALER_UPDATE_INTERVAL_S": "1", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "10"}


def load(path: Path | str) -> dict[str, Any]:
    """The local autoscaling config, checked; ConfigError naming the fix otherwise."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no autoscaling config at {path}: pass a file such as "
                          "configs/cluster/autoscale-local.yaml")
    doc = yaml.safe_load(path.read_text()) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of cluster settings")
    if (doc.get("provider") or {}).get("type") != PROVIDER:
        raise ConfigError(f"{path}: provider.type must be {PROVIDER!r} for a local cluster; "
                          "a cloud config goes to `medray cluster up --config`")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    types = doc.get("available_node_types") or {}
    head = doc.get("head_node_type")
    if head not in types:
        raise ConfigError(f"{path}: head_node_type {head!r} is not one of available_node_types "
                          f"{sorted(types)}")
    for name, spec in types.items():
        extra = set(spec or {}) - _TYPE_KEYS
        if extra:
            raise ConfigError(f"{path}: node type {name!r} has unknown key(s) {sorted(extra)}")
        res = (spec or {}).get("resources") or {}
        if not isinstance(res.get("CPU"), int | float) or res["CPU"] <= 0:
            raise ConfigError(f"{path}: node type {name!r} needs resources.CPU > 0")
        if name != head and int(spec.get("max_workers", 0)) < int(spec.get("min_workers", 0)):
            raise ConfigError(f"{path}: node type {name!r} has max_workers < min_workers")
    return doc


def worker_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def max_resources(cfg: dict[str, Any]) -> dict[str, float]:
    """The most of each resource the cluster can have: the head's plus every worker type at
    its max_workers (an upper bound: the total max_workers may cap it lower)."""
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    total: dict[str, float] = {k: float(v) for k, v in head.items()}
    for spec in worker_types(cfg).values():
        for key, value in spec["resources"].items():
            total[key] = total.get(key, 0.0) + float(value) * int(spec.get("max_workers", 0))
    return total


def ray_config(cfg: dict[str, Any], gcs_address: str) -> dict[str, Any]:
    """The complete config Ray's autoscaler reads (it fills in no defaults itself)."""
    types: dict[str, Any] = {RAY_HEAD_TYPE: {
        "resources": dict(cfg["available_node_types"][cfg["head_node_type"]]["resources"]),
        "node_config": {}, "min_workers": 0, "max_workers": 0}}
    for name, spec in worker_types(cfg).items():
        types[name] = {"resources": dict(spec["resources"]), "node_config": {},
                       "min_workers": int(spec.get("min_workers", 0)),
                       "max_workers": int(spec.get("max_workers", 0)),
                       "labels": {**{str(k): str(v) for k, v in (spec.get("labels") or {}).items()},
                                  NODE_TYPE_LABEL: name}}
        if "priority" in spec:
            types[name]["priority"] = int(spec["priority"])
    return {
        "cluster_name": cfg.get("cluster_name", "medray-local"),
        "max_workers": int(cfg.get("max_workers", sum(
            t["max_workers"] for t in types.values()))),
        "upscaling_speed": float(cfg.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": float(cfg.get("idle_timeout_minutes", 5)),
        "provider": {"type": PROVIDER, "gcs_address": gcs_address,
                     # nodes are started ready: no SSH, no setup commands
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     # every fake node has this machine's IP: tell them apart by node id
                     # (else idle nodes are never found idle, and never removed)
                     "use_node_id_as_ip": True},
        "auth": {"ssh_user": "ray"},
        "docker": {},
        "head_node_type": RAY_HEAD_TYPE,
        "available_node_types": types,
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def up(config: Path | str, dashboard_port: int | None = 8265,
       timeout_s: float = 120.0) -> dict[str, Any]:
    """Start the autoscaling cluster: the head only; workers come when jobs ask for them."""
    cfg = load(config)
    current = ray_local.status()
    if current.get("running") and not current.get("autoscale"):
        raise ConfigError("a local cluster without autoscaling is running: stop it with "
                          "`medray cluster down`, then start this one")
    head = cfg["available_node_types"][cfg["head_node_type"]]["resources"]
    custom = {k: v for k, v in head.items() if k not in ("CPU", "GPU")}
    most = max_resources(cfg)

    def extras(gcs_address: str) -> ray_local.HeadExtras:
        path = ray_local.ray_dir() / "autoscaling.json"
        write_private(path, json.dumps(ray_config(cfg, gcs_address), indent=2))
        args = [f"--autoscaling-config={path}"]
        if custom:
            args.append(f"--resources={json.dumps(custom)}")
        return ray_local.HeadExtras(
            args=tuple(args),
            env={"RAY_FAKE_CLUSTER": "1", **_AUTOSCALER_ENV,
                 env.AUTOSCALE_MAX_RESOURCES: json.dumps(most)},
            record={"autoscale": {"config": str(Path(config).resolve()),
                                  "node_types": sorted(worker_types(cfg)),
                                  "max_resources": most}})

    return ray_local.up(nodes=1, num_cpus=int(head["CPU"]), num_gpus=int(head.get("GPU", 0)),
                        dashboard_port=dashboard_port, timeout_s=timeout_s, extras=extras)


def reachable_resources(have: dict[str, float]) -> dict[str, float]:
    """What the cluster this process runs in can reach: ``have`` (its alive nodes' resources),
    or more where an autoscaler may add nodes (the head's MEDRAY_AUTOSCALE_MAX_RESOURCES)."""
    most = json.loads(env.get(env.AUTOSCALE_MAX_RESOURCES) or "{}")
    return {k: max(float(have.get(k, 0.0)), float(most.get(k, 0.0)))
            for k in set(have) | set(most)}
