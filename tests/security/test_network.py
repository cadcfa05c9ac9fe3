"""What listens where, and who may talk to it.

medray controls the embedded S3 server (bound to 127.0.0.1) and the Ray dashboard / Jobs API
(127.0.0.1); Ray's own GCS, raylets, object managers, agents and core workers (a job driver is
one) bind to every interface by Ray's design and are protected by Ray's token auth, which must
stay on. SECURITY.md states it. Every wildcard listener must be one of Ray's components,
recognised by its exact command line and place in the cluster's process tree, not by a name
any process can take.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import faults as h

pytestmark = [pytest.mark.integration]
LOOPBACK = {"127.0.0.1", "::1"}
ANY = {"0.0.0.0", "::"}  # noqa: S104 - what we look for, not what we bind
log = logging.getLogger(__name__)


def _listeners(procs: list[h.psutil.Process]) -> list[tuple[str, str, int]]:
    return [(name, ip, port) for _, name, ip, port in _listening(procs)]


def _listening(procs: list[h.psutil.Process]) -> list[tuple[h.psutil.Process, str, str, int]]:
    out = []
    for proc in procs:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == h.psutil.CONN_LISTEN:
                    out.append((proc, name, conn.laddr.ip, conn.laddr.port))
        except (h.psutil.NoSuchProcess, h.psutil.AccessDenied):
            continue
    return out


_RAY = Path(importlib.util.find_spec("ray").origin).parent  # type: ignore[union-attr, arg-type]
RAY_BINARIES = {str(_RAY / "core/src/ray/gcs/gcs_server"): "gcs_server",
                str(_RAY / "core/src/ray/raylet/raylet"): "raylet"}
RAY_SCRIPTS = {str(_RAY / "dashboard/dashboard.py"): "dashboard",
               str(_RAY / "autoscaler/_private/monitor.py"): "autoscaler monitor",
               str(_RAY / "_private/log_monitor.py"): "log monitor"}
RAY_MODULES = {"ray.util.client.server": "Ray client server"}


def ray_role(cmd: list[str], ancestors: list[list[str]]) -> str | None:
    """Which of Ray's components a process is, from its command line and its ancestors' (the
    nearest first); None when it is none of them.

    Ray's binaries and scripts are recognised by their full paths in the installed ``ray``
    package, run by this interpreter; a retitled ``ray::...`` process only as a child of a
    raylet (Ray starts its workers and agents); medray's job driver only as a descendant of a
    ``ray::JobSupervisor`` (the Jobs API starts it): a driver is a Ray core worker."""
    if not cmd:
        return None
    if cmd[0] in RAY_BINARIES:
        return RAY_BINARIES[cmd[0]]
    if cmd[0] == sys.executable:
        args = [a for a in cmd[1:] if a not in ("-u", "-B")]
        if args and args[0] in RAY_SCRIPTS:
            return RAY_SCRIPTS[args[0]]
        if args[:1] == ["-m"] and len(args) > 1:
            if args[1] in RAY_MODULES:
                return RAY_MODULES[args[1]]
            if args[1] == "medray.jobs.entry" and any(
                    a and a[0].startswith("ray::JobSupervisor") for a in ancestors):
                return "medray job driver (a Ray core worker)"
        return None
    if " ".join(cmd).startswith("ray::") and ancestors and ancestors[0] \
            and ancestors[0][0] in RAY_BINARIES and RAY_BINARIES[ancestors[0][0]] == "raylet":
        return f"Ray worker {cmd[0].split()[0]}"
    return None


def _role(proc: h.psutil.Process) -> str | None:
    try:
        return ray_role(proc.cmdline(), [p.cmdline() for p in proc.parents()])
    except (h.psutil.NoSuchProcess, h.psutil.AccessDenied):
        return None


def test_s3_server_listens_on_loopback_only(s3_server):
    weed = h.psutil.Process(int(s3_server["pid"]))
    listens = _listeners([weed, *weed.children(recursive=True)])
    port = int(s3_server["endpoint"].rsplit(":", 1)[1])
    assert port in {p for _, _, p in listens}, listens
    assert {ip for _, ip, _ in listens} <= LOOPBACK, listens


def _dashboard_port(ray_cluster) -> int:
    return int(ray_cluster["dashboard_url"].rsplit(":", 1)[1])


def test_jobs_api_listens_on_loopback_only(ray_cluster):
    assert ray_cluster["dashboard_url"].startswith("http://127.0.0.1:")
    port = _dashboard_port(ray_cluster)
    on_port = [(c.laddr.ip, c.pid) for c in h.psutil.net_connections(kind="inet")
               if c.status == h.psutil.CONN_LISTEN and c.laddr.port == port]
    assert on_port and {ip for ip, _ in on_port} <= LOOPBACK, on_port


def test_ray_listeners_on_all_interfaces_are_only_rays_own(ray_cluster):
    """Inventory: every wildcard listener is one of Ray's components by its exact command line
    (gcs_server, raylet, Ray's scripts, workers and agents the raylet started, a job driver the
    Jobs API started); the Jobs API port is on loopback."""
    listening = _listening(h.cluster_processes(ray_cluster["temp_dir"]))
    assert listening
    port = _dashboard_port(ray_cluster)
    for _, name, ip, p in listening:
        if p == port:
            assert ip in LOOPBACK, (name, ip, p)
    wildcard = [(proc, ip, p) for proc, _, ip, p in listening if ip in ANY]
    roles = {(h.cmdline(proc)[:80], p): _role(proc) for proc, _, p in wildcard}
    log.info("wildcard listeners: %s", roles)
    assert {r for r in roles.values() if r is not None} >= {"gcs_server", "raylet"}
    strangers = sorted(key for key, role in roles.items() if role is None)
    assert not strangers, f"not a Ray component, yet listening on all interfaces: {strangers}"


_PY = sys.executable
_RAYLET = [str(_RAY / "core/src/ray/raylet/raylet"), "--node_ip_address=127.0.0.1"]


@pytest.mark.parametrize(("cmd", "ancestors", "role"), [
    ([str(_RAY / "core/src/ray/gcs/gcs_server"), "--port=1"], [], "gcs_server"),
    ([_PY, "-u", str(_RAY / "autoscaler/_private/monitor.py"), "--x"], [], "autoscaler monitor"),
    (["ray::IDLE"], [_RAYLET], "Ray worker ray::IDLE"),
    ([_PY, "-m", "medray.jobs.entry", "score", "--spec", "e30="],
     [["/bin/sh", "-c", "..."], ["ray::JobSupervisor"], _RAYLET],
     "medray job driver (a Ray core worker)"),
    # what the old name-based rule let through
    ([_PY, "-m", "http.server", "--bind", "0.0.0.0"], [_RAYLET], None),  # noqa: S104
    ([_PY, "/tmp/dashboard.py"], [], None),  # noqa: S108 - a look-alike outside the package
    (["ray::Impostor"], [["/usr/bin/bash"]], None),  # a retitled process Ray did not start
    ([_PY, "-m", "medray.jobs.entry", "score"], [["/usr/bin/bash"]], None),
    (["/usr/bin/python3", "-m", "ray.util.client.server"], [], None),  # not this interpreter
])
def test_the_inventory_knows_rays_processes_by_their_exact_command_line(cmd, ancestors, role):
    assert ray_role(cmd, ancestors) == role


def _request(url: str, token: str | None, method: str = "GET", body: bytes | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_jobs_api_refuses_requests_without_the_token(ray_cluster, medray_home):
    _, token = h.ray_state(medray_home)
    url = ray_cluster["dashboard_url"]
    assert _request(f"{url}/api/jobs/", token) == 200  # the endpoint exists
    # Ray's token middleware: 401 without a token, 403 with a wrong one
    assert _request(f"{url}/api/jobs/", None) == 401
    assert _request(f"{url}/api/jobs/", "0" * 64) == 403
    submit = json.dumps({"entrypoint": "echo pwned", "submission_id": "medray-evil"}).encode()
    assert _request(f"{url}/api/jobs/", None, "POST", submit) == 401
    assert _request(f"{url}/api/jobs/medray-evil", token) == 404  # nothing was submitted


_CONNECT = textwrap.dedent("""
    import sys, ray
    try:
        ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
        print("CONNECTED", ray.cluster_resources().get("CPU"))
    except Exception as exc:
        print("REFUSED", type(exc).__name__, str(exc)[:300])
""")


def _connect(gcs: str, env: dict[str, str]) -> str:
    clean = {k: v for k, v in h.os.environ.items() if not k.startswith("RAY_AUTH")}
    try:
        proc = subprocess.run([sys.executable, "-c", _CONNECT, gcs], env={**clean, **env},
                              capture_output=True, text=True, timeout=90, check=False)
    except subprocess.TimeoutExpired:
        return "TIMEOUT"
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]


@pytest.mark.slow
def test_gcs_refuses_drivers_without_the_token(ray_cluster, medray_home):
    """The GCS listens on every interface (Ray's design): a driver without the token, or with a
    wrong one, must not get in; the right token does (so the refusal is the token's)."""
    gcs = ray_cluster["gcs_address"]
    token_file = str(medray_home / "ray" / "auth_token")
    ok = _connect(gcs, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_file})
    assert ok.startswith("CONNECTED"), ok
    for env in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "f" * 64}):
        result = _connect(gcs, env)
        assert not result.startswith("CONNECTED"), (env, result)
