"""Pinning a local cluster's nodes to CPU sets (ray_local.up's ``cpu_sets``, used by
bench/bench_score.py --pin-nodes): the argv each node's ``ray start`` runs under."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medray.cluster.infra import ray_local
from medray.workers.errors import ConfigError


def test_each_node_starts_under_taskset_on_its_own_cpu_set() -> None:
    pinned = ray_local._pinning(["0", "2-3"])
    taskset = shutil.which("taskset")
    assert pinned(0) == [taskset, "-c", "0"]
    assert pinned(1) == [taskset, "-c", "2-3"]


def test_unpinned_nodes_start_as_they_are() -> None:
    assert ray_local._pinning(None)(0) == []


def test_a_cpu_set_per_node_is_required_before_anything_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDRAY_HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="1 CPU set"):
        ray_local.up(nodes=2, cpu_sets=["0"])
    assert not (tmp_path / "ray").exists()


def test_pinning_without_taskset_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_local.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="util-linux"):
        ray_local._pinning(["0", "1"])
