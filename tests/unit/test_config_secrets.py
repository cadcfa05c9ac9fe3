"""The Ray token reaches every node from a synced file or a Kubernetes Secret, and no secret
is committed: configs/, docker/ and the cloud guide are scanned for keys and tokens."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import pytest

from tests.support.configs import (
    ALL_YAML,
    DOCKERFILES,
    TOKEN_SECRET,
    aws,
    dockerfile_instructions,
    env_of,
    kube_doc,
    load_all,
    pod_specs,
    scanned_files,
    secret_volume_mount_paths,
)
from tests.support.paths import ROOT


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
