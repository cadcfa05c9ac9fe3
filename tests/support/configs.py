"""Readers of configs/, docker/ and pyproject.toml for the config tests (tests/unit/test_config_*).

Offline and plain: YAML, TOML and Dockerfile text, nothing built, pulled or applied.
"""

from __future__ import annotations

import functools
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from medray.workers.specs import build_spec
from tests.support.paths import ROOT

CONFIGS = ROOT / "configs"
CLUSTER = CONFIGS / "cluster"
KUBERAY = CLUSTER / "kuberay"
AWS = CLUSTER / "aws.yaml"
DOCKER = ROOT / "docker"
DOCS = ROOT / "docs" / "cloud.md"

JOB_SPECS = sorted(CONFIGS.glob("*.yaml"))
ALL_YAML = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml"))
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "gpu": DOCKER / "Dockerfile.gpu"}
EXPECTED_KINDS = {
    "nightly-score.yaml": "score",
    "retrain-chexnet.yaml": "train",
    "stage-chestxray14.yaml": "stage",
    "stage-pneumoniamnist.yaml": "stage",
}
TOKEN_SECRET = "medray-ray-token"
GPU_INSTANCE_FAMILY = re.compile(r"^(g\d|p\d|gr\d)")  # EC2 families with NVIDIA GPUs

# <registry>/medray:<medray version>-ray<ray version>-py<XY>-<cpu|gpu>
OUR_IMAGE = re.compile(
    r"^(?:[^/\s]+/)*medray:(?P<medray>[^-\s]+)-ray(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)"
    r"-(?P<flavor>cpu|gpu)$"
)
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<flavor>cpu|gpu)$")


@functools.cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml has no dependency on {name}")


@functools.cache
def ray_pin() -> str:
    specs = list(requirement("ray").specifier)
    assert len(specs) == 1 and specs[0].operator == "==", (
        f"ray must be pinned exactly in pyproject.toml (cluster nodes and clients must match), "
        f"got {requirement('ray').specifier}"
    )
    return specs[0].version


@functools.cache
def python_tag() -> str:
    """The lowest Python 3.x that requires-python allows, as an image tag suffix ('311')."""
    allowed = SpecifierSet(pyproject()["project"]["requires-python"])
    for minor in range(8, 30):
        if Version(f"3.{minor}") in allowed:
            return f"3{minor}"
    raise AssertionError("requires-python allows no Python 3.8-3.29")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kube_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in load_all(p)]


def kube_doc(kind: str) -> dict[str, Any]:
    found = [d for d in kube_docs() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under {KUBERAY}, found {len(found)}"
    return found[0]


def aws() -> dict[str, Any]:
    return yaml.safe_load(AWS.read_text())


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield (dotted path, key, value) for every mapping entry in a nested YAML document."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            yield here, key, value
            yield from walk(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def images_in(doc: dict[str, Any]) -> dict[str, str]:
    return {
        where: value
        for where, key, value in walk(doc)
        if key in ("image", "head_image", "worker_image") and isinstance(value, str)
    }


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and ARG defaults substituted."""
    joined, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    args: dict[str, str] = {}
    out = []
    for text in joined:
        instr, _, rest = text.strip().partition(" ")
        instr = instr.upper()
        if instr == "ARG" and "=" in rest:
            name, _, default = rest.strip().partition("=")
            args[name] = default.strip().strip('"')
        for name, value in args.items():
            rest = rest.replace("${" + name + "}", value).replace("$" + name, value)
        out.append((instr, rest.strip()))
    return out


def pip_install_args(path: Path) -> list[str]:
    """Every argument given to `pip install` in the Dockerfile's RUN instructions."""
    found: list[str] = []
    for instr, rest in dockerfile_instructions(path):
        if instr != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for word in [*lexer, ";"]:
            if word not in ("&&", "||", ";", "|"):
                command.append(word)
                continue
            for i in range(len(command) - 1):
                if command[i].endswith("pip") and command[i + 1] == "install":
                    found += command[i + 2 :]
            command = []
    return found


def module_file(module: str) -> Path | None:
    """Source file of a medray module through [tool.setuptools.package-dir]; None if unmapped."""
    package_dir: dict[str, str] = pyproject()["tool"]["setuptools"]["package-dir"]
    for package in sorted(package_dir, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            rest = module[len(package) :].lstrip(".").split(".") if module != package else []
            base = ROOT / package_dir[package]
            candidate = base.joinpath(*rest) if rest else base
            return candidate.with_suffix(".py") if rest else candidate / "__init__.py"
    return None


def pod_specs() -> dict[str, dict[str, Any]]:
    """Every pod spec in the KubeRay manifests, by a readable name."""
    specs: dict[str, dict[str, Any]] = {}
    cluster = kube_doc("RayCluster")["spec"]
    specs["RayCluster head"] = cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        specs[f"RayCluster worker group {group['groupName']}"] = group["template"]["spec"]
    specs["RayJob submitter"] = kube_doc("RayJob")["spec"]["submitterPodTemplate"]["spec"]
    specs["CronJob"] = kube_doc("CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return specs


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_volume_mount_paths(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """mountPath -> secretName for the container's mounts of Secret volumes."""
    secrets = {
        v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v
    }
    return {
        m["mountPath"]: secrets[m["name"]]
        for m in container.get("volumeMounts", [])
        if m["name"] in secrets
    }


def job_spec(name: str) -> Any:
    """configs/NAME as the validated spec the CLI would build (its class: StageSpec, ...)."""
    doc = yaml.safe_load((CONFIGS / name).read_text())
    return build_spec(doc.pop("kind"), doc)


def scanned_files() -> list[Path]:
    """Every file a cluster operator deploys from this repository: configs/, docker/, the guide."""
    files = [p for p in CONFIGS.rglob("*") if p.is_file()]
    files += [p for p in DOCKER.rglob("*") if p.is_file()]
    if DOCS.exists():
        files.append(DOCS)
    return sorted(files)
