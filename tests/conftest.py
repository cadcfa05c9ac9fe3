"""Shared fixtures: a private MEDRAY_HOME, a real SeaweedFS S3 server and a real local Ray
cluster (started once per test session, stopped at the end), and helpers to drive the CLI.

Tests never reach real AWS: the AWS variables of the outer environment are removed.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
MEDRAY = str(Path(sys.executable).parent / "medray")

_SESSION_HOME = Path(
    os.environ.get("MEDRAY_TEST_HOME") or f"/tmp/medray-test-{uuid.uuid4().hex[:8]}"
)  # noqa: S108


def _clean_env() -> None:
    for key in list(os.environ):
        if key.startswith("AWS_") or key in (
            "MEDRAY_LAKE",
            "RAY_ADDRESS",
            "MEDRAY_FAULT",
            "RAY_AUTH_TOKEN",
            "RAY_AUTH_TOKEN_PATH",
            "RAY_AUTH_MODE",
        ):
            os.environ.pop(key)
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    os.environ["MEDRAY_HOME"] = str(_SESSION_HOME)
    os.environ.setdefault("MEDRAY_STORAGE_RETRY_SECONDS", "30")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"


_clean_env()


@pytest.fixture(scope="session")
def medray_home() -> Iterator[Path]:
    _SESSION_HOME.mkdir(parents=True, exist_ok=True, mode=0o700)
    yield _SESSION_HOME
    if not os.environ.get("MEDRAY_TEST_HOME"):  # a home the run made itself is removed after it
        import shutil

        shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server(medray_home: Path) -> Iterator[dict]:
    from medray.cluster.infra import s3server

    info = s3server.up()
    yield info
    s3server.down()


@pytest.fixture
def s3_lake(s3_server: dict) -> str:
    """A fresh prefix in the embedded S3 lake for one test."""
    return f"s3://{s3_server['bucket']}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def local_lake(tmp_path: Path) -> str:
    return str(tmp_path / "lake")


@pytest.fixture(scope="session")
def ray_cluster(medray_home: Path) -> Iterator[dict]:
    from medray.cluster.infra import ray_local

    info = ray_local.up(num_cpus=2, dashboard_port=None)
    yield info
    ray_local.down()


def run_cli(
    *args: str, check: bool = True, env: dict | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [MEDRAY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"medray {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-6000:]}"
        )
    return proc


def cli_json(*args: str, **kw) -> dict:
    proc = run_cli(*args, "--json", **kw)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    if not DATA.exists():
        pytest.skip(f"{DATA} is missing")
    return DATA


def small_npz(path: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """A MedMNIST-style .npz cut from the real PneumoniaMNIST file (both classes kept)."""
    d = np.load(DATA)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in per_split.items():
        labels = d[f"{split}_labels"].ravel()
        idx = np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), n // 2, replace=False) for c in (0, 1)]
        )
        out[f"{split}_images"] = d[f"{split}_images"][idx]
        out[f"{split}_labels"] = d[f"{split}_labels"][idx]
    np.savez(path, **out)
    return path


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 0.25):
    """Poll ``check`` until it returns something truthy (returned); AssertionError after
    ``timeout`` seconds, naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def bomb_png(path: Path, side: int = 40_000) -> Path:
    """A PNG whose header (valid CRC) claims side x side pixels, with almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body +
                struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path
