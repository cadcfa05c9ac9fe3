"""The floor plan, checked: which package may import which (run by `make lint` and a unit test).

Every ``.py`` file under ``jobs/``, ``cluster/`` and ``workers/`` (subfolders included) is parsed,
never imported, and each import is held to these rules:

- layers import downward only: ``jobs -> cluster -> workers``;
- medray's own modules are imported by their installed names (``medray.workers.specs``), never
  by folder (``workers.specs`` only works from the checkout);
- ``cluster/store`` and ``cluster/infra`` are shared by every job: they import no job package;
- job packages (``cluster/stage|train|score|report``) do not import each other;
- ``workers`` stay pure: no Ray and no storage (boto3, s3fs, pyarrow.fs, ``medray.cluster``)
  anywhere, and no TensorFlow/Keras at import time (inside a function is fine, so the CLI and
  the unit tests never pay for TensorFlow they do not use).

    python tools/check_layers.py [--root DIR]     # exit 1 and one line per problem
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"workers": 0, "cluster": 1, "jobs": 2}
JOB_PACKAGES = ("stage", "train", "score", "report", "publish")
SHARED_PACKAGES = ("store", "infra")
WORKERS_NEVER = ("ray", "boto3", "botocore", "s3fs", "pyarrow.fs")  # medray.cluster: upward
WORKERS_NOT_AT_IMPORT = ("tensorflow", "keras", "tf_keras")


@dataclass(frozen=True)
class Import:
    line: int
    module: str  # absolute dotted name: ``from M import a`` is M.a (a may be a module)
    at_import: bool  # runs when the module is imported (not inside a function or TYPE_CHECKING)
    parent: str | None = None  # M of ``from M import a``: checked before M.a


def module_name(root: Path, path: Path) -> str:
    """'cluster/store/lake.py' -> 'medray.cluster.store.lake' (its installed name)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["medray", *parts])


def _absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(root: Path, path: Path) -> list[Import]:
    here = module_name(root, path)
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, at_import: bool) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            at_import = False
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, at_import)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(node.lineno, a.name, at_import) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, here, is_package)
            found.extend(Import(node.lineno, f"{module}.{a.name}" if a.name != "*" else module,
                                at_import, module) for a in node.names)
        for nested in ast.iter_child_nodes(node):
            visit(nested, at_import)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), True)
    return found


def _within(module: str, prefixes: tuple[str, ...]) -> str | None:
    """The prefix ``module`` is, or is inside of (``pyarrow.fs`` holds ``pyarrow.fs.S3...``)."""
    return next((p for p in prefixes if module == p or module.startswith(p + ".")), None)


def problems_of(here: str, imp: Import) -> list[str]:
    """What is wrong with one import in module ``here`` (an installed name)."""
    if imp.parent is not None:
        found = list(_problems(here, imp.parent, imp.at_import))
        if found:
            return found
    return list(_problems(here, imp.module, imp.at_import))


def _problems(here: str, module: str, at_import: bool) -> Iterator[str]:
    layer = here.split(".")[1]
    parts = module.split(".")
    if parts[0] in RANK:
        yield f"imports {module}: use the installed name medray.{module}"
        return
    if parts[0] != "medray" or len(parts) < 2:
        if layer == "workers" and (bad := _within(module, WORKERS_NEVER)):
            yield f"workers stay pure: imports {bad} (Ray and storage belong in medray.cluster)"
        if layer == "workers" and at_import and (tf := _within(module, WORKERS_NOT_AT_IMPORT)):
            yield (f"workers import {tf} at import time: import it inside the function that "
                   "needs it")
        return
    target = parts[1]
    if RANK.get(target, -1) > RANK[layer]:
        yield f"{layer} imports {module} (upward: jobs -> cluster -> workers only)"
        return
    if layer == "cluster" and target == "cluster" and len(parts) > 2 and len(here.split(".")) > 2:
        mine, theirs = here.split(".")[2], parts[2]
        if mine in SHARED_PACKAGES and theirs in JOB_PACKAGES:
            yield (f"cluster/{mine} imports the job package {module}: store and infra "
                   "serve every job and import none")
        elif mine in JOB_PACKAGES and theirs in JOB_PACKAGES and mine != theirs:
            yield (f"job package {mine} imports job package {module}: move what both need "
                   "to workers, cluster/store or cluster/infra")


def check(root: Path = ROOT) -> list[str]:
    """Every problem in the tree under ``root`` as 'path:line: message', layer by layer."""
    found: list[str] = []
    for layer in RANK:
        for path in sorted((root / layer).rglob("*.py")):
            here = module_name(root, path)
            rel = path.relative_to(root)
            for imp in imports(root, path):
                found.extend(f"{rel}:{imp.line}: {msg}" for msg in problems_of(here, imp))
    return list(dict.fromkeys(found))  # `from M import a, b` with M at fault: one line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout to check")
    args = parser.parse_args(argv)
    found = check(args.root.resolve())
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
