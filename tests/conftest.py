"""Fixtures and hooks shared by every suite (helpers that tests import live in tests/support).

- every test gets the marker of its suite folder (``unit``, ``integration``, ``e2e``,
  ``faults``, ``security``), so ``pytest -m "not faults"`` and the make targets select by suite;
- a private MEDRAY_HOME, a real SeaweedFS S3 server and a real local Ray cluster, started once
  per test session when a test asks for them and stopped at the end.

Tests never reach real AWS: the AWS variables of the outer environment are removed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.paths import DATA

TESTS = Path(__file__).resolve().parent
SUITES = ("unit", "integration", "e2e", "faults", "security")  # folder = marker (pyproject)

_SESSION_HOME = Path(
    os.environ.get("MEDRAY_TEST_HOME") or f"/tmp/medray-test-{uuid.uuid4().hex[:8]}"
)


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            suite = item.path.relative_to(TESTS).parts[0]
        except ValueError:  # a test file given from outside tests/: not ours to mark
            continue
        if suite not in SUITES:
            raise pytest.UsageError(
                f"{item.nodeid}: tests live in a suite folder ({', '.join(SUITES)}) so they "
                "get its marker; move the file into one"
            )
        item.add_marker(suite)


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
def s3_server(medray_home: Path) -> Iterator[dict[str, Any]]:
    from medray.cluster.infra import s3server

    info = s3server.up()
    yield info
    s3server.down()


@pytest.fixture
def s3_lake(s3_server: dict[str, Any]) -> str:
    """A fresh prefix in the embedded S3 lake for one test."""
    return f"s3://{s3_server['bucket']}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def local_lake(tmp_path: Path) -> str:
    """A fresh local-folder lake for one test."""
    return str(tmp_path / "lake")


@pytest.fixture(scope="session")
def ray_cluster(medray_home: Path) -> Iterator[dict[str, Any]]:
    from medray.cluster.infra import ray_local

    info = ray_local.up(num_cpus=2, dashboard_port=None)
    yield info
    ray_local.down()


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    if not DATA.exists():
        pytest.skip(f"{DATA} is missing")
    return DATA
