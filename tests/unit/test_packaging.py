"""The wheel holds every package and module of the checkout, and each imports by its installed
name (``medray.cluster.store.lake``), from the wheel, not from the checkout.

pyproject.toml lists the packages one by one (the folders install under mapped names), so a new
subfolder left out of that list would ship a wheel without it while the editable install used
for development still finds it. A real wheel is built (about 2 s) from a copy of the sources,
so no build/ or .egg-info lands in the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from tests.support.paths import ROOT

LAYERS = ("jobs", "cluster", "workers")


def installed_name(root: Path, parts: tuple[str, ...]) -> str:
    """The installed name of a folder (its path parts under ``root``): the deepest folder that
    pyproject's package-dir maps decides (``jobs/toplevel`` is ``medray`` itself), else
    ``medray.`` and the path."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    folders = {tuple(PurePosixPath(d).parts): name for name, d in mapping.items()}
    for cut in range(len(parts), 0, -1):
        if parts[:cut] in folders:
            return ".".join([folders[parts[:cut]], *parts[cut:]])
    return ".".join(["medray", *parts])


def source_packages(root: Path) -> set[str]:
    """Installed names of every folder under the layers that holds Python modules."""
    return {
        installed_name(root, path.parent.relative_to(root).parts)
        for layer in LAYERS
        for path in (root / layer).rglob("*.py")
        if "__pycache__" not in path.parts
    }


def source_modules(root: Path) -> set[str]:
    """Installed names of every module under the layers (a package as its own name)."""
    names = set()
    for layer in LAYERS:
        for path in (root / layer).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                names.add(installed_name(root, parts[:-1]))
            else:
                names.add(f"{installed_name(root, parts[:-1])}.{parts[-1]}")
    return names


def build_wheel(src: Path, out: Path) -> Path:
    """Copy what a build needs to ``out/src`` and build the wheel there (no network)."""
    work = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    work.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(src / name, work / name)
    for layer in LAYERS:
        shutil.copytree(src / layer, work / layer, ignore=ignore)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(work), "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "-q", "-w", str(out / "dist")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"the wheel did not build:\n{proc.stderr[-3000:]}"
    (wheel,) = (out / "dist").glob("medray-*.whl")
    return wheel


def wheel_modules(wheel: Path) -> set[str]:
    names = set()
    with zipfile.ZipFile(wheel) as zf:
        for entry in zf.namelist():
            path = PurePosixPath(entry)
            if path.suffix == ".py" and path.parts[0] == "medray":
                parts = list(path.with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                names.add(".".join(parts))
    return names


def missing_from_wheel(src: Path, wheel: Path) -> list[str]:
    """Modules of the source tree the wheel lacks, each with the package it belongs to."""
    shipped = wheel_modules(wheel)
    return sorted(m for m in source_modules(src) if m not in shipped)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    unlisted = source_packages(ROOT) - listed
    assert not unlisted, f"add {sorted(unlisted)} to [tool.setuptools] packages in pyproject.toml"
    stale = listed - source_packages(ROOT)
    assert not stale, f"pyproject.toml lists packages with no modules: {sorted(stale)}"


def test_the_wheel_holds_every_module(wheel: Path) -> None:
    assert missing_from_wheel(ROOT, wheel) == []
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "medray = medray.jobs.cli:main" in zf.read(entry_points).decode()
    stray = sorted({n.split("/", 1)[0] for n in names} - {"medray"}
                   - {n.split("/", 1)[0] for n in names if ".dist-info/" in n})
    assert stray == [], f"the wheel puts {stray} at the top of site-packages"


def test_a_package_left_out_of_pyproject_is_caught(tmp_path: Path) -> None:
    """Guard for the two tests above: drop one subpackage from the list and both notice."""
    src = tmp_path / "checkout"
    src.mkdir()
    text = (ROOT / "pyproject.toml").read_text()
    cut, n = re.subn(r'^\s*"medray\.cluster\.store",\n', "", text, flags=re.M)
    assert n == 1, "pyproject.toml should list medray.cluster.store once"
    (src / "pyproject.toml").write_text(cut)
    shutil.copy2(ROOT / "README.md", src / "README.md")
    for layer in LAYERS:
        shutil.copytree(ROOT / layer, src / layer, ignore=shutil.ignore_patterns("__pycache__"))
    listed = set(tomllib.loads(cut)["tool"]["setuptools"]["packages"])
    assert source_packages(src) - listed == {"medray.cluster.store"}
    missing = missing_from_wheel(src, build_wheel(src, tmp_path / "build"))
    assert missing and all(m.split(".")[:3] == ["medray", "cluster", "store"] for m in missing), \
        missing


def test_every_module_imports_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    """Each module by its installed name, in a fresh interpreter whose ``medray`` is the
    unpacked wheel (not the editable checkout). The CLI's and the workers' modules come first:
    importing them must not load TensorFlow or Ray (the CLI prints --help without them)."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    modules = sorted(wheel_modules(wheel), key=lambda m: (m.startswith("medray.cluster"), m))
    code = (
        "import importlib, json, sys\n"
        f"root, failed, heavy = {str(site)!r}, {{}}, None\n"
        f"for name in {modules!r}:\n"
        "    if heavy is None and name.startswith('medray.cluster'):\n"
        "        heavy = sorted(m for m in ('tensorflow', 'keras', 'ray') if m in sys.modules)\n"
        "    try:\n"
        "        module = importlib.import_module(name)\n"
        "        if not str(module.__file__).startswith(root):\n"
        "            failed[name] = f'imported from {module.__file__}, not the wheel'\n"
        "    except Exception as exc:\n"
        "        failed[name] = f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps({'failed': failed, 'heavy': heavy}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(modules) > 40
    assert report["failed"] == {}
    assert report["heavy"] == [], "medray.jobs and medray.workers must not import TF or Ray"
