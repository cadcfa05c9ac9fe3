"""Run mypy on medray's packages by their installed names (medray.jobs, medray.cluster, ...).

The folders install under mapped names (``jobs/`` -> ``medray.jobs``) through setuptools'
editable-install import hook, which mypy cannot follow. This links the three folders under
``build/typecheck/medray/`` (the ``mypy_path`` of pyproject's ``[tool.mypy]``), runs mypy on
them and prints its report with paths in the repository (``jobs/entry.py``), not the links.

    python tools/typecheck.py                      # every package (what `make typecheck` runs)
    python tools/typecheck.py -p medray.workers    # some of them; any other mypy flags pass on
    python tools/typecheck.py tests/support        # files, with medray resolvable for them
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINKS = ROOT / "build" / "typecheck" / "medray"
LAYERS = ("jobs", "cluster", "workers")
PACKAGES = tuple(f"medray.{layer}" for layer in LAYERS)


def link_tree() -> None:
    """Point build/typecheck/medray/<layer> at each layer's folder (idempotent)."""
    LINKS.mkdir(parents=True, exist_ok=True)
    for layer in LAYERS:
        link = LINKS / layer
        target = Path("..", "..", "..", layer)  # relative: the checkout may move
        if link.is_symlink() and Path(link.readlink()) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)


def in_repo(report: str) -> str:
    """mypy names files by the path it found them at: map the links back to the folders."""
    for layer in LAYERS:
        for prefix in (f"{LINKS}/{layer}/", f"build/typecheck/medray/{layer}/"):
            report = report.replace(prefix, f"{layer}/")
    return report


def main(argv: list[str]) -> int:
    from mypy import api

    link_tree()
    args = list(argv)
    targets = ("-p", "--package", "-m", "--module", "-c", "--command")
    if not any(a in targets or Path(a).exists() for a in args):  # no packages, files or code
        args += [flag for pkg in PACKAGES for flag in ("-p", pkg)]
    stdout, stderr, status = api.run(["--config-file", str(ROOT / "pyproject.toml"), *args])
    sys.stdout.write(in_repo(stdout))
    sys.stderr.write(in_repo(stderr))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
