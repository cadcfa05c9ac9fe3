"""Ray, Python and TensorFlow are the same everywhere: pyproject's pins, the node images of the
cluster configs (Ray launcher, KubeRay) and the Dockerfiles that build them."""

from __future__ import annotations

import copy
import re

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.support.configs import (
    AWS,
    DOCKERFILES,
    KUBERAY,
    OUR_IMAGE,
    RAY_IMAGE,
    aws,
    dockerfile_instructions,
    images_in,
    kube_docs,
    load_all,
    pip_install_args,
    pyproject,
    python_tag,
    ray_pin,
    requirement,
    walk,
)


def test_aws_config_passes_ray_launcher_schema() -> None:
    # Ray's own launcher checks (private modules of the pinned Ray: a move fails here, loudly)
    from ray.autoscaler._private import docker, util

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
