"""A local Ray cluster on this machine: a head (dashboard + Jobs API on 127.0.0.1) and
optionally more worker nodes (separate raylets), with Ray's token authentication on.

State lives under ``MEDRAY_HOME/ray``: the token (0600) and ``cluster.json`` (addresses, no
secret). Stopping kills only this cluster's processes, never another Ray on the machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medray.cluster.infra import env
from medray.cluster.infra.home import create_private_once, medray_home, read_json, write_private
from medray.workers.errors import ConfigError, InfraError

log = logging.getLogger(__name__)
# The node type of a node that Ray's autoscaler started on this machine (autoscale.py)
NODE_TYPE_LABEL = "medray.io/node-type"


def _ray_dir() -> Path:
    d = medray_home() / "ray"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def ray_dir() -> Path:
    """Where this home's cluster state lives (token, cluster.json, an autoscaling config)."""
    return _ray_dir()


def token_path() -> Path:
    path = _ray_dir() / "auth_token"
    if not path.exists():
        create_private_once(path, secrets.token_hex(32))
    return path


def auth_env() -> dict[str, str]:
    """Environment that makes Ray clients and nodes use this cluster's token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path())}


def apply_auth_env() -> None:
    """Point this process's Ray clients at the local token unless the user chose their own."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        return
    os.environ.update(auth_env())


def _temp_dir() -> str:
    # Ray puts unix sockets under its temp dir; keep the path short (108-byte socket limit).
    digest = hashlib.sha256(str(medray_home()).encode()).hexdigest()[:10]
    return f"/tmp/medray-ray-{digest}"  # noqa: S108 - per-home private dir


def _free_port(preferred: int | None = None) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise InfraError("no free TCP port on 127.0.0.1")


def _ray_binary() -> str:
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def status() -> dict[str, Any]:
    cfg = read_json(_ray_dir() / "cluster.json")
    if not cfg:
        return {"running": False}
    running = _dashboard_alive(cfg["dashboard_url"])
    info: dict[str, Any] = {**cfg, "running": running}
    if running:
        info.update(_resources(cfg["dashboard_url"]))
    return info


def _dashboard_alive(url: str) -> bool:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _resources(dashboard_url: str) -> dict[str, Any]:
    """Alive nodes with their CPUs and GPUs, from the dashboard's state API."""
    import urllib.request

    token = token_path().read_text().strip()
    req = urllib.request.Request(  # noqa: S310 - loopback URL we started
        f"{dashboard_url}/nodes?view=summary",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            payload = json.loads(resp.read())
    except OSError as exc:
        return {"nodes": None, "error": str(exc)}
    nodes = []
    for node in payload.get("data", {}).get("summary", []):
        raylet = node.get("raylet", {})
        if raylet.get("state") != "ALIVE":
            continue
        res = raylet.get("resourcesTotal", {})
        labels = raylet.get("labels") or {}
        nodes.append(
            {
                "node_id": raylet.get("nodeId"),
                "is_head": bool(raylet.get("isHeadNode")),
                "cpus": res.get("CPU", 0),
                "gpus": res.get("GPU", 0),
                # set on nodes an autoscaler started (Ray's node-group label)
                "node_type": labels.get("ray.io/node-group") or labels.get(NODE_TYPE_LABEL)
                or ("head" if raylet.get("isHeadNode") else "worker"),
            }
        )
    return {
        "nodes": len(nodes),
        "cpus": sum(n["cpus"] for n in nodes),
        "gpus": sum(n["gpus"] for n in nodes),
        "node_list": nodes,
    }


@dataclass(frozen=True)
class HeadExtras:
    """What an autoscaling cluster adds to `ray start --head` (see ``autoscale.py``)."""

    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    record: Mapping[str, Any] = field(default_factory=dict)  # kept in cluster.json


def up(
    nodes: int = 1,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    dashboard_port: int | None = 8265,
    timeout_s: float = 120.0,
    extras: Callable[[str], HeadExtras] | None = None,
    cpu_sets: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Start the local cluster (idempotent); ``nodes`` > 1 adds worker raylets on this host.

    ``extras`` gets the GCS address and returns what the head needs besides (an autoscaler).
    ``cpu_sets``, one per node, head first, in taskset's form ("0", "2-3"): each node's Ray
    processes, and every worker it starts, run on those cores only, so that the raylets of one
    machine stand for nodes with cores of their own (bench/bench_score.py --pin-nodes)."""
    if nodes < 1:
        raise ConfigError("--nodes must be at least 1")
    if cpu_sets is not None and len(cpu_sets) != nodes:
        raise ConfigError(f"cpu_sets names {len(cpu_sets)} CPU set(s) for {nodes} node(s)")
    pinned = _pinning(cpu_sets)
    current = status()
    if current.get("running"):
        return current
    ray_env = {**os.environ, **auth_env()}
    ray_env.pop(env.RAY_ADDRESS, None)
    gcs_port = _free_port(6380)
    dash_port = _free_port(dashboard_port)
    common = ["--disable-usage-stats", "--node-ip-address=127.0.0.1"]

    def node_ports() -> list[str]:
        # Per-node agent ports are fixed by default (52365, ...): pick free ones so this
        # cluster can run beside another Ray on the same machine (a user's, a test's).
        return [
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
        ]

    per_node_cpus = num_cpus if num_cpus is not None else max(1, (os.cpu_count() or 2) // nodes)
    head = [
        _ray_binary(),
        "start",
        "--head",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={_temp_dir()}",
        f"--num-cpus={per_node_cpus}",
        *common,
        *node_ports(),
    ]
    if num_gpus is not None:
        head.append(f"--num-gpus={num_gpus}")
    cfg: dict[str, Any] = {
        "gcs_address": f"{_node_ip()}:{gcs_port}",
        "dashboard_url": f"http://127.0.0.1:{dash_port}",
        "temp_dir": _temp_dir(),
        "requested_nodes": nodes,
        "python": sys.executable,
    }
    # recorded before anything starts, so `down` can clean up after a start that failed half-way
    write_private(_ray_dir() / "cluster.json", json.dumps(cfg, indent=2))
    try:
        if extras is not None:
            more = extras(cfg["gcs_address"])
            head += list(more.args)
            ray_env.update(more.env)
            cfg.update(more.record)
            write_private(_ray_dir() / "cluster.json", json.dumps(cfg, indent=2))
        _start_head(pinned(0) + head, ray_env, cfg)
        for i in range(1, nodes):
            worker = [
                _ray_binary(),
                "start",
                f"--address={cfg['gcs_address']}",
                f"--num-cpus={per_node_cpus}",
                *common,
                *node_ports(),
            ]
            if num_gpus is not None:
                worker.append(f"--num-gpus={num_gpus}")
            _run_ray(pinned(i) + worker, ray_env)
        _wait_nodes(cfg["dashboard_url"], nodes, timeout_s)
    except BaseException:
        down()
        raise
    return status()


def _pinning(cpu_sets: Sequence[str] | None) -> Callable[[int], list[str]]:
    """The argv prefix that runs node i's ``ray start`` on its CPU set ([] when unpinned)."""
    if cpu_sets is None:
        return lambda i: []
    taskset = shutil.which("taskset")
    if taskset is None:
        raise ConfigError("pinning nodes to CPUs needs `taskset` (Debian: util-linux)")
    return lambda i: [taskset, "-c", cpu_sets[i]]


def _start_head(cmd: list[str], env: dict[str, str], cfg: dict[str, Any], tries: int = 3) -> None:
    """`ray start --head`, again after a clean-up when the GCS was too slow to answer (seen on
    loaded 2-core machines as 'RPC error: Deadline Exceeded')."""
    for attempt in range(1, tries + 1):
        try:
            _run_ray(cmd, env)
            return
        except InfraError as exc:
            if "Deadline Exceeded" not in str(exc) or attempt == tries:
                raise
            log.warning("Ray head start timed out (attempt %d/%d), retrying", attempt, tries)
            _kill_cluster(cfg)
            time.sleep(2 * attempt)


def _node_ip() -> str:
    # Ray replaces 127.0.0.1 with the host's reachable address; ask it which one it chose.
    from ray._private.services import get_node_ip_address

    return str(get_node_ip_address())


def _run_ray(cmd: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(  # noqa: S603 - fixed argv
        cmd, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    if proc.returncode != 0:
        raise InfraError(f"`{' '.join(cmd[:3])}` failed:\n{proc.stderr[-2000:]}")


def _wait_nodes(dashboard_url: str, nodes: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _dashboard_alive(dashboard_url):
            info = _resources(dashboard_url)
            if (info.get("nodes") or 0) >= nodes:
                return
        time.sleep(1)
    raise InfraError(f"the local Ray cluster did not show {nodes} node(s) in {timeout_s:.0f}s")


def _cluster_processes(temp_dir: str, gcs_address: str = "") -> list[Any]:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        mine = temp_dir in cmdline or (gcs_address and gcs_address in cmdline)
        if mine and proc.pid != os.getpid():
            found.append(proc)
    return found


def _kill_cluster(cfg: dict[str, Any], grace_s: float = 10.0) -> None:
    import psutil

    procs = _cluster_processes(cfg["temp_dir"], cfg.get("gcs_address", ""))
    family: dict[int, Any] = {}
    for proc in procs:
        family[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                family[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    for proc in family.values():
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(family.values()), timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def down(grace_s: float = 10.0) -> bool:
    """Stop this cluster's processes (head, worker raylets, workers, job drivers)."""
    path = _ray_dir() / "cluster.json"
    cfg = read_json(path)
    if not cfg:
        return False
    _kill_cluster(cfg, grace_s)
    path.unlink(missing_ok=True)
    return True


def dashboard_url(address: str | None) -> str:
    """The Jobs API URL for --address / RAY_ADDRESS, defaulting to the local cluster."""
    address = address or env.get(env.RAY_ADDRESS) or None
    if address and address not in ("auto", "local"):
        return address if "://" in address else f"http://{address}"
    cfg = read_json(_ray_dir() / "cluster.json")
    if not cfg:
        raise ConfigError(
            "no Ray cluster: start one with `medray cluster up` or pass --address / RAY_ADDRESS"
        )
    return str(cfg["dashboard_url"])


def reachable(address: str | None) -> dict[str, float] | None:
    """The most of each resource the local autoscaling cluster can grow to, when ``address``
    is that cluster; None otherwise (a fixed cluster, or one this home did not start)."""
    cfg = read_json(_ray_dir() / "cluster.json")
    if not cfg or not cfg.get("autoscale") or not is_local(address):
        return None
    return {str(k): float(v) for k, v in cfg["autoscale"]["max_resources"].items()}


def is_local(address: str | None) -> bool:
    cfg = read_json(_ray_dir() / "cluster.json")
    if not cfg:
        return False
    return dashboard_url(address) == cfg["dashboard_url"]
