"""What listens where, and who may talk to it.

medray controls the embedded S3 server (bound to 127.0.0.1) and the Ray dashboard / Jobs API
(127.0.0.1); Ray's own GCS, raylets, object managers and agents bind to every interface by
Ray's design and are protected by Ray's token auth, which must stay on. SECURITY.md states it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest

from tests.support import faults as h

pytestmark = [pytest.mark.integration]
LOOPBACK = {"127.0.0.1", "::1"}
ANY = {"0.0.0.0", "::"}  # noqa: S104 - what we look for, not what we bind
log = logging.getLogger(__name__)


def _listeners(procs: list[h.psutil.Process]) -> list[tuple[str, str, int]]:
    out = []
    for proc in procs:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == h.psutil.CONN_LISTEN:
                    out.append((name, conn.laddr.ip, conn.laddr.port))
        except (h.psutil.NoSuchProcess, h.psutil.AccessDenied):
            continue
    return out


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
    """Inventory: every wildcard listener belongs to a Ray process (gcs_server, raylet, Ray
    workers and agents), none to the dashboard or a medray process."""
    listens = _listeners(h.cluster_processes(ray_cluster["temp_dir"]))
    assert listens
    port = _dashboard_port(ray_cluster)
    for name, ip, p in listens:
        if p == port:
            assert ip in LOOPBACK, (name, ip, p)
    wildcard = sorted({n for n, ip, _ in listens if ip in ANY})
    log.info("cluster listeners: %s", sorted(set(listens)))
    allowed = ("gcs_server", "raylet", "ray::", "python", "default_worker")
    assert all(n.startswith(allowed) for n in wildcard), wildcard


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
    assert _request(f"{url}/api/jobs/", None) in (401, 403)
    assert _request(f"{url}/api/jobs/", "0" * 64) in (401, 403)
    submit = json.dumps({"entrypoint": "echo pwned", "submission_id": "medray-evil"}).encode()
    assert _request(f"{url}/api/jobs/", None, "POST", submit) in (401, 403)
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
