"""``medray doctor`` against the session's real cluster and S3 lake: a healthy setup passes
(exit 0), and each planted problem (a stopped cluster, an unwritable lake, wrong credentials)
is reported on its own line with its fix (exit 1)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_cli


def _doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    """Exit code, the --json report by check name, and the human output of the same setup."""
    proc = run_cli("doctor", *args, "--json", check=False, env=env, timeout=120)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    human = run_cli("doctor", *args, check=False, env=env, timeout=120)
    assert human.returncode == proc.returncode, human.stderr
    report["by_name"] = {c["name"]: c for c in report["checks"]}
    return proc.returncode, report, human.stdout


def test_healthy_setup_passes(ray_cluster: dict[str, Any], s3_lake: str) -> None:
    code, report, human = _doctor("--lake", s3_lake)
    assert code == 0, human
    assert report["ok"] is True
    checks = report["by_name"]
    assert set(checks) == {"credentials", "lake", "cluster", "gpus", "tensorflow", "spill disk"}
    assert all(c["ok"] and not c["skipped"] for c in checks.values()), human
    assert "embedded lake's key file" in checks["credentials"]["detail"]
    assert "same as here" in checks["cluster"]["detail"]
    # the probe job imported TensorFlow on every node: no GPU here, as Ray says
    nodes = int(checks["gpus"]["detail"].split(" node(s)")[0].rsplit(" ", 1)[1])
    assert checks["tensorflow"]["detail"] == (
        f"TensorFlow sees 0 GPU(s) on {nodes} node(s), as many as Ray schedules on each")
    assert human.count("\n") == 6 and "PROBLEM" not in human


def test_stopped_cluster_is_named_with_its_fix(s3_lake: str) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, report, human = _doctor("--lake", s3_lake, "--address", f"127.0.0.1:{port}")
    assert code == 1
    cluster = report["by_name"]["cluster"]
    assert not cluster["ok"]
    assert f"no Ray cluster answers at http://127.0.0.1:{port}" in cluster["detail"]
    assert "medray cluster up" in cluster["fix"]
    assert report["by_name"]["gpus"]["skipped"] is True
    assert report["by_name"]["lake"]["ok"] is True  # only the planted problem is reported
    line = next(x for x in human.splitlines() if x.startswith("PROBLEM cluster"))
    assert "-> fix: `medray cluster up`" in line


def _read_only(folder: Path) -> None:
    """Mode 0500; root ignores modes, so as root the folder is made immutable as well."""
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"root here cannot make a folder unwritable: {done.stderr!r}")


def _writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True, check=False)
    folder.chmod(0o700)


def test_unwritable_lake_is_named_with_its_fix(ray_cluster: dict[str, Any], tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    _read_only(lake)
    try:
        code, report, human = _doctor("--lake", str(lake))
    finally:
        _writable(lake)
    assert code == 1
    check = report["by_name"]["lake"]
    assert not check["ok"]
    assert f"{lake} is not writable" in check["detail"]
    assert check["fix"] == f"`chmod u+rwx {lake}` or pass another --lake"
    assert report["by_name"]["cluster"]["ok"] is True
    assert f"PROBLEM lake        {lake} is not writable" in human
    assert not list(lake.iterdir())


def test_wrong_credentials_are_named_with_their_fix(
    ray_cluster: dict[str, Any], s3_server: dict[str, Any], s3_lake: str
) -> None:
    wrong = {
        "AWS_ACCESS_KEY_ID": "MEDRAYWRONGKEY000000",
        "AWS_SECRET_ACCESS_KEY": "wrong-secret-for-the-doctor-test-000000",
        "AWS_ENDPOINT_URL": s3_server["endpoint"],
    }
    code, report, human = _doctor("--lake", s3_lake, env=wrong)
    assert code == 1
    creds, lake = report["by_name"]["credentials"], report["by_name"]["lake"]
    assert creds["ok"] and creds["detail"] == "from the environment (AWS_ACCESS_KEY_ID)"
    assert not lake["ok"]
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in lake["fix"]
    for secret in wrong.values():  # the keys themselves never appear
        if secret.startswith("http"):
            continue
        assert secret not in human and secret not in json.dumps(report)
