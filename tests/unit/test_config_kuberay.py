"""The KubeRay manifests point at each other: the RayJob and CronJob reach the cluster and the
mounted spec, the ConfigMap copy matches configs/, kustomize lists and builds them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import PurePosixPath
from typing import Any

import pytest
import yaml

from tests.support.configs import (
    CONFIGS,
    KUBERAY,
    env_of,
    kube_doc,
    kube_docs,
    pod_specs,
)


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
