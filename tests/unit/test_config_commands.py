"""The commands the cluster configs and images run exist in the code: the console script, the
job entry module, and every `medray` subcommand and option they pass."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.configs import (
    AWS,
    DOCKERFILES,
    KUBERAY,
    dockerfile_instructions,
    load_all,
    module_file,
    pyproject,
    scanned_files,
)
from tests.support.paths import ROOT


def test_medray_console_script_is_declared() -> None:
    scripts = pyproject()["project"]["scripts"]
    assert "medray" in scripts, "configs run `medray ...`: pyproject must declare the script"
    module, _, func = scripts["medray"].partition(":")
    assert module.startswith("medray.") and func


def test_console_script_module_exists() -> None:
    module = pyproject()["project"]["scripts"]["medray"].partition(":")[0]
    path = module_file(module)
    assert path is not None, f"{module} is not under any [tool.setuptools.package-dir] package"
    assert path.exists(), f"the console script runs {module}, but {path} does not exist"


def test_job_entry_module_exists() -> None:
    """`python -m medray.jobs.entry` is what the CLI submits; configs may run others."""
    mentioned = {"medray.jobs.entry"}
    for path in scanned_files():
        mentioned |= set(re.findall(r"python3? -m (medray(?:\.\w+)+)", path.read_text()))
    for module in sorted(mentioned):
        source = module_file(module)
        assert source is not None, f"{module} is not a medray package module"
        assert source.exists(), f"`python -m {module}` is run, but {source} does not exist"


def strings_in(node: Any) -> Iterator[str]:
    """Every string scalar of a YAML document (values and list items; comments are gone)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings_in(value)


def medray_invocations() -> dict[str, set[str]]:
    """Subcommand -> the --options that the cluster configs and images pass to it."""
    texts = [
        s
        for p in [AWS, *sorted(KUBERAY.glob("*.yaml"))]
        for d in load_all(p)
        for s in strings_in(d)
    ]
    texts += [r for p in DOCKERFILES.values() for i, r in dockerfile_instructions(p) if i == "RUN"]
    used: dict[str, set[str]] = {}
    for text in texts:
        for m in re.finditer(r"(?<![\w/.-])medray ([a-z][a-z-]*)([^\n|;&]*)", text):
            options = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", m.group(2)))
            used.setdefault(m.group(1), set()).update(options)
    return used


def test_configs_run_the_expected_medray_commands() -> None:
    used = medray_invocations()
    assert {"submit", "report"} <= set(used)
    assert {"--set", "--address"} <= used["submit"]
    assert "--reference" in used["report"]


@pytest.mark.parametrize("command", sorted(medray_invocations()))
def test_medray_command_used_by_configs_exists(command: str) -> None:
    module, _, func = pyproject()["project"]["scripts"]["medray"].partition(":")
    code = (
        f"import sys; from {module} import {func} as main; "
        "sys.argv = ['medray', *sys.argv[1:]]; sys.exit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"`medray {command} --help` failed:\n{result.stderr[-2000:]}"
    for option in medray_invocations()[command]:
        if option != "--help":
            assert option in result.stdout, f"`medray {command}` has no {option} option"
