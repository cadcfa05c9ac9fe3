"""Layers import downward only: jobs -> cluster -> workers. Fails on any upward import and on
Ray, storage or TensorFlow-at-import in workers (workers stay pure)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"workers": 0, "cluster": 1, "jobs": 2}
WORKERS_FORBIDDEN = ("ray", "boto3", "s3fs", "pyarrow.fs", "medray.cluster", "medray.jobs")


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
    return found


def main() -> int:
    problems = []
    for layer, rank in RANK.items():
        for path in sorted((ROOT / layer).glob("*.py")):
            for line, module in imports(path):
                parts = module.split(".")
                upward = (
                    parts[0] == "medray" and len(parts) > 1 and RANK.get(parts[1], -1) > rank
                )
                if upward:
                    problems.append(
                        f"{path.relative_to(ROOT)}:{line}: {layer} imports {module} (upward)"
                    )
                if layer == "workers" and module.startswith(WORKERS_FORBIDDEN):
                    problems.append(
                        f"{path.relative_to(ROOT)}:{line}: workers must stay pure "
                        f"(imports {module})"
                    )
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
