"""The real ``medray`` command in a subprocess, as a user or a script would run it."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from tests.support.paths import MEDRAY


def run_cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run ``medray ARGS``; with ``check`` a non-zero exit fails the test with both outputs."""
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


def cli_json(*args: str, **kw: Any) -> dict[str, Any]:
    """``medray ARGS --json``: the one JSON object it prints last on stdout."""
    proc = run_cli(*args, "--json", **kw)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result
