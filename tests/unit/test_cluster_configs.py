"""configs/ and docker/ agree with the code: spec keys, Ray/Python/TF pins, GPUs, token wiring.

Fast and offline: YAML, TOML and text parsing, the job spec classes, and Ray's own cluster
launcher schema (shipped in the ray wheel). Nothing here reaches a cloud, a registry or Docker.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
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


# ---------------------------------------------------------------------------------------------
# helpers


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


def walk(node: Any, path: str = ""):
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


def build_spec(kind: str, values: dict[str, Any]) -> Any:
    from medray.workers.specs import build_spec as build

    return build(kind, values)


def job_spec(name: str) -> Any:
    doc = yaml.safe_load((CONFIGS / name).read_text())
    return build_spec(doc.pop("kind"), doc)


# ---------------------------------------------------------------------------------------------
# every YAML parses; job specs validate against the spec classes


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_expected_job_specs_exist() -> None:
    assert set(EXPECTED_KINDS) <= {p.name for p in JOB_SPECS}


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_job_spec_validates(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert "kind" in doc, f"{path.name}: a job spec needs `kind: stage|train|score|report`"
    kind = doc.pop("kind")
    if path.name in EXPECTED_KINDS:
        assert kind == EXPECTED_KINDS[path.name]
    spec = build_spec(kind, doc)  # ConfigError (unknown key, bad value) fails the test
    assert spec.kind == kind


def test_spec_validation_is_strict() -> None:
    """Guard for the test above: a misspelt key must not slip through as a default."""
    from medray.workers.errors import ConfigError

    doc = yaml.safe_load((CONFIGS / "nightly-score.yaml").read_text())
    doc.pop("kind")
    doc["only_neww"] = doc.pop("only_new")
    with pytest.raises(ConfigError, match="only_new"):
        build_spec("score", doc)


def test_nightly_score_is_incremental_with_the_promoted_model() -> None:
    spec = job_spec("nightly-score.yaml")
    assert spec.only_new, "the nightly run must score only images not scored before"
    assert spec.model.endswith("@prod"), "the nightly run scores with the promoted model"
    assert spec.gpus_per_actor >= 1 and spec.gpus_per_actor == int(spec.gpus_per_actor)
    assert spec.run_id is None, "the schedule sets run_id per night (--set run_id=...)"


def test_retrain_is_multi_gpu_densenet() -> None:
    spec = job_spec("retrain-chexnet.yaml")
    assert (spec.arch, spec.weights, spec.class_weights) == ("densenet121", "imagenet", "auto")
    assert spec.workers > 1 and spec.gpus_per_worker == 1
    assert spec.dataset == job_spec("stage-chestxray14.yaml").dataset


def test_pneumoniamnist_source_resolves_from_the_spec_file() -> None:
    """`medray submit` resolves a relative stage source against the spec file's folder."""
    spec = job_spec("stage-pneumoniamnist.yaml")
    source = (CONFIGS / spec.source).resolve()
    assert source.suffix == ".npz"
    if not source.exists():
        pytest.skip(f"{source} is not on this machine (shared data lives beside the checkout)")


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_job_spec_loads_through_the_cli_loader(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same file through `medray submit`'s loader (precedence, path resolution, validation)."""
    specfile = pytest.importorskip("medray.jobs.specfile", reason="the CLI's spec loader")
    monkeypatch.delenv("MEDRAY_LAKE", raising=False)
    kind, values = specfile.load_spec_file(path, [], None)
    assert kind == yaml.safe_load(path.read_text())["kind"]
    source = values.get("source")
    if kind == "stage" and source and "://" not in source and not Path(source).is_absolute():
        pytest.skip(f"{path.name}: source {source} is not on this machine")


# ---------------------------------------------------------------------------------------------
# Ray / Python / TensorFlow pins are the same everywhere


def test_aws_config_passes_ray_launcher_schema() -> None:
    util = pytest.importorskip("ray.autoscaler._private.util")
    docker = pytest.importorskip("ray.autoscaler._private.docker")
    raw = aws()
    prepared = util.prepare_config(copy.deepcopy(raw))  # merges Ray's AWS defaults, offline
    util.validate_config(prepared)
    docker.validate_docker_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_images_in_cluster_configs_match_pins() -> None:
    version = pyproject()["project"]["version"]
    found: dict[str, str] = {}
    for path in [AWS, *sorted(KUBERAY.glob("*.yaml"))]:
        for doc in load_all(path):
            for where, image in images_in(doc).items():
                found[f"{path.name}:{where}"] = image
    assert sum(1 for k in found if k.startswith("aws.yaml")) >= 2
    assert sum(1 for k in found if not k.startswith("aws.yaml")) >= 3
    for where, image in found.items():
        m = OUR_IMAGE.match(image)
        assert m, f"{where}: {image!r} is not a medray node image (…/medray:V-rayX-pyXY-cpu|gpu)"
        assert m["ray"] == ray_pin(), f"{where}: Ray {m['ray']} != pyproject's pin {ray_pin()}"
        assert m["py"] == python_tag(), f"{where}: py{m['py']} != py{python_tag()}"
        assert m["medray"] == version, f"{where}: medray {m['medray']} != pyproject {version}"


def test_ray_version_fields_match_pin() -> None:
    versions = [v for d in kube_docs() for _, k, v in walk(d) if k == "rayVersion"]
    assert versions, "the RayCluster should state rayVersion"
    assert set(versions) == {ray_pin()}


def test_literal_ray_version_checks_match_pin() -> None:
    """`assert ray.__version__ == 'X'` in images and setup commands must say the pinned version."""
    texts = [AWS.read_text(), *(p.read_text() for p in DOCKERFILES.values())]
    seen = [v for t in texts for v in re.findall(r"ray\.__version__ == '([^']+)'", t)]
    assert seen, "the image build and the launcher setup should verify the Ray version"
    assert set(seen) == {ray_pin()}


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_base_image_matches_pins(flavor: str) -> None:
    froms = [
        rest for instr, rest in dockerfile_instructions(DOCKERFILES[flavor]) if instr == "FROM"
    ]
    assert len(froms) == 1, "one build stage expected"
    m = RAY_IMAGE.match(froms[0].split()[0])
    assert m, f"FROM {froms[0]!r} is not rayproject/ray:X-pyXY-cpu|gpu"
    assert (m["ray"], m["py"], m["flavor"]) == (ray_pin(), python_tag(), flavor)


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_installs_the_project(flavor: str) -> None:
    path = DOCKERFILES[flavor]
    instructions = dockerfile_instructions(path)
    copied = " ".join(rest for instr, rest in instructions if instr in ("COPY", "ADD"))
    for needed in ("pyproject.toml", "README.md", "jobs", "cluster", "workers"):
        assert needed in copied, f"{path.name} does not COPY {needed}"
    args = pip_install_args(path)
    assert "." in args, f"{path.name} must `pip install .` (the project, with its pins)"
    assert "-e" not in args and "--editable" not in args, "install the project, not a link to it"


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_tensorflow_satisfies_pyproject(flavor: str) -> None:
    wanted = requirement("tensorflow").specifier
    reqs = [
        Requirement(a) for a in pip_install_args(DOCKERFILES[flavor]) if a.startswith("tensorflow")
    ]
    assert len(reqs) == 1, f"{DOCKERFILES[flavor].name} should pin tensorflow once"
    (req,) = reqs
    pins = [s for s in req.specifier if s.operator == "=="]
    assert len(pins) == 1, f"pin an exact TensorFlow in the image, got {req}"
    assert Version(pins[0].version) in wanted, f"{req} is outside pyproject's tensorflow{wanted}"
    if flavor == "gpu":
        assert "and-cuda" in req.extras, "the GPU image needs tensorflow[and-cuda]"


def test_cpu_and_gpu_images_share_one_tensorflow() -> None:
    versions = set()
    for path in DOCKERFILES.values():
        for arg in pip_install_args(path):
            if arg.startswith("tensorflow"):
                versions |= {s.version for s in Requirement(arg).specifier}
    assert len(versions) == 1, f"CPU and GPU images pin different TensorFlow versions: {versions}"


# ---------------------------------------------------------------------------------------------
# GPUs: worker groups that should have them request them; capacity covers the jobs


def test_aws_node_types() -> None:
    config = aws()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not GPU_INSTANCE_FAMILY.match(head["node_config"]["InstanceType"]), "CPU head"
    assert head["resources"].get("CPU", 0) > 0 and head["resources"].get("GPU", 0) == 0
    gpu_types = {}
    for name, node_type in types.items():
        node = node_type["node_config"]
        assert "IamInstanceProfile" in node, f"{name}: needs an instance profile for S3 (the lake)"
        if GPU_INSTANCE_FAMILY.match(node["InstanceType"]):
            gpu_types[name] = node_type
            assert node_type["resources"].get("GPU", 0) >= 1, f"{name} must advertise its GPU"
            options = node_type.get("docker", {}).get("worker_run_options", [])
            assert "--gpus all" in options, f"{name}: the container must see the GPU"
        else:
            assert node_type["resources"].get("GPU", 0) == 0, f"{name} has no GPU"
    assert all(t.get("min_workers", 0) == 0 for t in gpu_types.values()), "GPUs scale from 0"
    spot = {n for n, t in gpu_types.items() if "InstanceMarketOptions" in t["node_config"]}
    on_demand = set(gpu_types) - spot
    assert spot and on_demand, "a spot GPU type and an on-demand fallback are both expected"
    for name in spot:
        assert types[name]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert min(types[n].get("priority", 0) for n in spot) > max(
        types[n].get("priority", 0) for n in on_demand
    ), "spot must be preferred (autoscaler v2 priority) over the on-demand fallback"


def _gpu_limit(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_kuberay_gpu_worker_groups_request_gpus() -> None:
    cluster = kube_doc("RayCluster")["spec"]
    for container in cluster["headGroupSpec"]["template"]["spec"]["containers"]:
        assert _gpu_limit(container) == 0, "the head is a CPU pod"
    gpu_groups = 0
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            flavor = OUR_IMAGE.match(container["image"])["flavor"]
            if flavor == "gpu":
                gpu_groups += 1
                assert _gpu_limit(container) >= 1, f"{group['groupName']}: GPU image, no GPU"
                requests = container["resources"].get("requests", {})
                assert int(requests.get("nvidia.com/gpu", _gpu_limit(container))) == _gpu_limit(
                    container
                ), "GPU requests must equal limits"
            else:
                assert _gpu_limit(container) == 0, f"{group['groupName']}: CPU image with a GPU"
    assert gpu_groups >= 1


def test_gpu_capacity_covers_the_jobs() -> None:
    score, train = job_spec("nightly-score.yaml"), job_spec("retrain-chexnet.yaml")
    needed = max(score.actors * score.gpus_per_actor, train.workers * train.gpus_per_worker)
    types = aws()["available_node_types"]
    aws_gpus = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0) for t in types.values())
    assert aws_gpus >= needed, f"aws.yaml can reach {aws_gpus} GPUs, the jobs need {needed}"
    kube_gpus = sum(
        g["maxReplicas"] * sum(_gpu_limit(c) for c in g["template"]["spec"]["containers"])
        for g in kube_doc("RayCluster")["spec"]["workerGroupSpecs"]
    )
    assert kube_gpus >= needed, f"the RayCluster can reach {kube_gpus} GPUs, jobs need {needed}"


# ---------------------------------------------------------------------------------------------
# the Ray token reaches every node, from a file or a Secret, never from this repository


def test_aws_token_reaches_every_node_from_a_synced_file() -> None:
    config = aws()
    mounts: dict[str, str] = config["file_mounts"]
    for remote, local in mounts.items():
        assert local.startswith(("~", "/")), (
            f"file_mounts {remote}: {local!r} must not be a path in the repo"
        )
        assert ROOT not in Path(local).expanduser().resolve().parents, f"{local} is inside the repo"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        text = " ".join(config[key])
        assert "RAY_AUTH_MODE=token" in text, f"{key} must start Ray with token auth"
        paths = re.findall(r"RAY_AUTH_TOKEN_PATH=(\S+?);?(?:\s|$)", text)
        assert paths, f"{key} must say where the token file is"
        for path in paths:
            assert any(PurePosixPath(remote) in PurePosixPath(path).parents for remote in mounts), (
                f"{key}: {path} is not inside a file_mounts folder"
            )
    run_options = " ".join(config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options and "RAY_AUTH_TOKEN_PATH=" in run_options


def test_kuberay_token_reaches_every_ray_container_from_a_secret() -> None:
    checked = 0
    for where, pod in pod_specs().items():
        for container in pod["containers"]:
            env = env_of(container)
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE"
            assert "value" not in env.get("RAY_AUTH_TOKEN", {}), f"{where}: literal token"
            path = env["RAY_AUTH_TOKEN_PATH"]["value"]
            mounts = secret_volume_mount_paths(pod, container)
            owner = [
                secret
                for mount, secret in mounts.items()
                if PurePosixPath(mount) in PurePosixPath(path).parents
            ]
            assert owner == [TOKEN_SECRET], f"{where}: {path} is not in a mount of {TOKEN_SECRET}"
            checked += 1
    assert checked >= 5
    cluster = kube_doc("RayCluster")["spec"]
    if cluster.get("enableInTreeAutoscaling"):
        options = cluster["autoscalerOptions"]
        env = {e["name"]: e for e in options["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", "the autoscaler sidecar needs the token"
        head = cluster["headGroupSpec"]["template"]["spec"]
        fake = {"volumeMounts": options["volumeMounts"]}
        mounts = secret_volume_mount_paths(head, fake)
        path = env["RAY_AUTH_TOKEN_PATH"]["value"]
        assert any(PurePosixPath(m) in PurePosixPath(path).parents for m in mounts)


def test_no_kubernetes_secret_is_committed() -> None:
    kinds = [d.get("kind") for p in ALL_YAML for d in load_all(p)]
    assert "Secret" not in kinds, "create Secrets with kubectl; never commit them"


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key assignment": re.compile(
        r"(?i)aws_secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{20,}"
    ),
    "literal Ray token": re.compile(r"RAY_AUTH_TOKEN=(?![\"']?\$)[\"']?[^\s\"']+"),
    "secret passed as a literal": re.compile(r"--from-literal=(?:auth_token|salt)="),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "hex token": re.compile(r"(?<![0-9a-f:])[0-9a-f]{32,}(?![0-9a-f])"),
}


def find_secrets(text: str) -> list[str]:
    problems = [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]
    # AWS secret access keys are 40 characters of base64 with mixed case and digits.
    for m in re.finditer(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])", text):
        token = m.group()
        if (
            any(c.isupper() for c in token)
            and any(c.islower() for c in token)
            and any(c.isdigit() for c in token)
        ):
            problems.append(f"40-character key-like string {token[:4]}...")
    return problems


def scanned_files() -> list[Path]:
    files = [p for p in CONFIGS.rglob("*") if p.is_file()]
    files += [p for p in DOCKER.rglob("*") if p.is_file()]
    if DOCS.exists():
        files.append(DOCS)
    return sorted(files)


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_secrets_in_file(path: Path) -> None:
    assert find_secrets(path.read_text()) == []


def test_secret_scan_catches_the_usual_suspects() -> None:
    # Built at run time so that this file holds no key-like literal itself.
    fake_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    fake_secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"
    assert find_secrets(f"aws_access_key_id = {fake_id}")
    assert find_secrets(f"key: {fake_secret}")
    assert find_secrets("export RAY_AUTH_TOKEN=" + "abc123" * 3)
    assert find_secrets("token: " + "0123456789abcdef" * 4)
    assert not find_secrets("export RAY_AUTH_TOKEN_PATH=/home/ray/.medray-secrets/auth_token")
    assert not find_secrets('export RAY_AUTH_TOKEN="$(cat /run/secrets/token)"')


@pytest.mark.parametrize("flavor", DOCKERFILES)
def test_dockerfile_sets_no_secret_environment(flavor: str) -> None:
    for instr, rest in dockerfile_instructions(DOCKERFILES[flavor]):
        if instr in ("ENV", "ARG"):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|SALT", rest), rest


# ---------------------------------------------------------------------------------------------
# the commands the configs run exist in the code


def test_medray_console_script_is_declared() -> None:
    scripts = pyproject()["project"]["scripts"]
    assert "medray" in scripts, "configs run `medray ...`: pyproject must declare the script"
    module, _, func = scripts["medray"].partition(":")
    assert module.startswith("medray.") and func


def test_console_script_module_exists() -> None:
    module = pyproject()["project"]["scripts"]["medray"].partition(":")[0]
    path = module_file(module)
    assert path is not None, f"{module} is not under any [tool.setuptools.package-dir] package"
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} not written yet (the CLI is in progress)")


def test_job_entry_module_exists() -> None:
    """`python -m medray.jobs.entry` is what the CLI submits; the lead is writing it."""
    mentioned = {"medray.jobs.entry"}
    for path in scanned_files():
        mentioned |= set(re.findall(r"python3? -m (medray(?:\.\w+)+)", path.read_text()))
    missing = []
    for module in sorted(mentioned):
        path = module_file(module)
        assert path is not None, f"{module} is not a medray package module"
        if not path.exists():
            missing.append(str(path.relative_to(ROOT)))
    if missing:
        pytest.skip(f"not written yet: {', '.join(missing)} (job entrypoints are in progress)")


def strings_in(node: Any):
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
    module = pyproject()["project"]["scripts"]["medray"].partition(":")[0]
    path = module_file(module)
    if path is None or not path.exists():
        pytest.skip(f"{module} not written yet (the CLI is in progress)")
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


# ---------------------------------------------------------------------------------------------
# the KubeRay pieces point at each other


def test_configmap_copy_of_nightly_spec_is_identical() -> None:
    configmaps = {d["metadata"]["name"]: d for d in kube_docs() if d.get("kind") == "ConfigMap"}
    copy_text = configmaps["medray-job-configs"]["data"]["nightly-score.yaml"]
    assert yaml.safe_load(copy_text) == yaml.safe_load((CONFIGS / "nightly-score.yaml").read_text())


def _mounted_configmap(pod: dict[str, Any], container: dict[str, Any], path: str) -> str | None:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if PurePosixPath(mount["mountPath"]) in PurePosixPath(path).parents:
            return volumes[mount["name"]].get("configMap", {}).get("name")
    return None


def test_rayjob_and_cronjob_reach_the_cluster_and_the_spec() -> None:
    cluster_name = kube_doc("RayCluster")["metadata"]["name"]
    rayjob = kube_doc("RayJob")["spec"]
    assert rayjob["clusterSelector"]["ray.io/cluster"] == cluster_name
    spec_paths = re.findall(r"medray submit (\S+)", rayjob["entrypoint"])
    assert spec_paths and "--address" in rayjob["entrypoint"]
    head = pod_specs()["RayCluster head"]
    # The RayJob entrypoint runs on the head pod: the spec must be mounted there.
    for path in spec_paths:
        assert _mounted_configmap(head, head["containers"][0], path) == "medray-job-configs"

    cron = pod_specs()["CronJob"]
    container = cron["containers"][0]
    script = " ".join(container.get("command", []) + container.get("args", []))
    address = env_of(container)["RAY_ADDRESS"]["value"]
    assert address.startswith(f"http://{cluster_name}-head-svc") and address.endswith(":8265")
    for path in re.findall(r"medray submit (\S+)", script):
        assert _mounted_configmap(cron, container, path) == "medray-job-configs"
    assert "pipefail" in script or "-e" in container.get("command", [])
    assert kube_doc("CronJob")["spec"]["concurrencyPolicy"] == "Forbid"


def test_kustomization_lists_the_long_lived_manifests() -> None:
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    for name in listed:
        assert (KUBERAY / name).exists(), f"kustomization lists missing {name}"
    expected = {
        p.name
        for p in KUBERAY.glob("*.yaml")
        if p.name not in ("kustomization.yaml", "rayjob-score.yaml")
    }
    assert listed == expected


def test_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(result.stdout) if d}
    assert {"RayCluster", "CronJob", "ConfigMap", "ServiceAccount"} <= kinds
