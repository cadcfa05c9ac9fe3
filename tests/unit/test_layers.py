"""tools/check_layers.py can fail: each rule of the floor plan, broken in a planted file of a
throw-away tree, is reported with its file and line; the allowed forms pass.

(The checkout itself is checked by tests/unit/test_cli.py::test_layers_import_downward_only.)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.paths import ROOT

CHECKER = ROOT / "tools" / "check_layers.py"


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_layers", CHECKER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


check_layers = _load_checker()

PACKAGES = ("jobs", "cluster", "cluster/store", "cluster/infra", "cluster/stage", "cluster/score",
            "workers", "workers/sub")


def tree(root: Path, planted: dict[str, str]) -> Path:
    """A minimal checkout: the packages of the floor plan, each with an allowed import, plus the
    planted files."""
    for package in PACKAGES:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text('"""pkg"""\n')
    (root / "jobs" / "sdk.py").write_text("from medray.cluster.store import lake\n")
    (root / "cluster" / "score" / "job.py").write_text(
        "from medray.cluster.infra import env\nfrom medray.workers.specs import ScoreSpec\n"
    )
    (root / "workers" / "specs.py").write_text("import numpy\nimport pyarrow as pa\n")
    for rel, text in planted.items():
        (root / rel).write_text(text)
    return root


def test_the_minimal_tree_is_clean(tmp_path: Path) -> None:
    assert check_layers.check(tree(tmp_path, {})) == []


VIOLATIONS = {
    "ray in workers": ("workers/a.py", "import ray\n", "workers stay pure: imports ray"),
    "ray in a workers function": (
        "workers/a.py", "def f() -> None:\n    import ray.data\n", "imports ray"),
    "pyarrow.fs in workers": ("workers/a.py", "from pyarrow import fs\n", "imports pyarrow.fs"),
    "s3fs in workers": ("workers/a.py", "import s3fs\n", "imports s3fs"),
    "tensorflow at import": (
        "workers/a.py", "import tensorflow as tf\n", "tensorflow at import time"),
    "keras in a class body": (
        "workers/a.py", "class A:\n    import keras\n", "keras at import time"),
    "keras in a try at top level": (
        "workers/a.py", "try:\n    import keras\nexcept ImportError:\n    keras = None\n",
        "keras at import time"),
    "workers reach up (subfolder)": (
        "workers/sub/deep.py", "from medray.cluster.store import lake\n", "upward"),
    "cluster reaches up": ("cluster/infra/x.py", "from medray.jobs import sdk\n", "upward"),
    "store imports a job package": (
        "cluster/store/x.py", "from medray.cluster.score import job\n",
        "cluster/store imports the job package medray.cluster.score"),
    "infra imports a job package by name": (
        "cluster/infra/x.py", "from medray.cluster import stage\n",
        "cluster/infra imports the job package medray.cluster.stage"),
    "job imports job": (
        "cluster/score/x.py", "import medray.cluster.stage.sources\n",
        "job package score imports job package medray.cluster.stage.sources"),
    "job imports job, relative": (
        "cluster/score/x.py", "from ..stage import sources\n",
        "job package score imports job package medray.cluster.stage:"),
    "folder name instead of installed name": (
        "jobs/x.py", "import workers.specs\n", "use the installed name medray.workers.specs"),
}


@pytest.mark.parametrize("rel, source, message", VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_a_planted_violation_is_reported(tmp_path: Path, rel: str, source: str,
                                         message: str) -> None:
    found = check_layers.check(tree(tmp_path, {rel: source}))
    assert len(found) == 1, found
    assert found[0].startswith(f"{rel}:"), found
    assert message in found[0], found


ALLOWED = {
    "tensorflow inside a function": "def f() -> None:\n    import tensorflow as tf\n",
    "keras for type checking only": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import keras\n"),
    "pyarrow itself": "import pyarrow.parquet as pq\nimport pyarrow.compute as pc\n",
    "workers from workers": "from medray.workers.specs import ScoreSpec\nfrom . import specs\n",
}


@pytest.mark.parametrize("source", ALLOWED.values(), ids=ALLOWED.keys())
def test_allowed_forms_pass(tmp_path: Path, source: str) -> None:
    assert check_layers.check(tree(tmp_path, {"workers/a.py": source})) == []


def test_job_packages_use_store_infra_and_workers(tmp_path: Path) -> None:
    source = ("from medray.cluster.store import lake\nfrom medray.cluster.infra import env\n"
              "from medray.cluster.score import remote\nfrom medray.workers import specs\n")
    assert check_layers.check(tree(tmp_path, {"cluster/score/x.py": source})) == []


def test_the_command_exits_1_and_names_the_line(tmp_path: Path) -> None:
    root = tree(tmp_path, {"workers/a.py": '"""doc"""\n\nimport os\nimport ray\n'})
    proc = subprocess.run([sys.executable, str(CHECKER), "--root", str(root)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        "workers/a.py:4: workers stay pure: imports ray (Ray and storage belong in medray.cluster)"
    ]
