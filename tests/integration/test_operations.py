"""Issue 7: job specs through `medray submit`, a 3-node local cluster that spreads scoring actors,
job history that survives a cluster restart, and cost per 1,000 images."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import yaml

from tests.support.cli import cli_json, run_cli
from tests.support.data import small_npz
from tests.support.paths import ROOT

pytestmark = pytest.mark.integration


def test_submit_spec_with_overrides(tmp_path, ray_cluster, local_lake):
    src = small_npz(tmp_path / "mini.npz", {"train": 40, "val": 10, "test": 10})
    spec = tmp_path / "stage.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "kind": "stage",
                "source": "mini.npz",
                "dataset": "fromspec",
                "image_size": 32,
                "label_names": ["normal", "pneumonia"],
            }
        )
    )
    # --set beats the file; the relative source resolves next to the spec file
    out = cli_json("submit", str(spec), "--set", "image_size=16", "--lake", local_lake)
    assert out["dataset"] == "fromspec" and out["images"] >= 55
    manifest = cli_json("datasets", "show", "fromspec", "--lake", local_lake)
    assert manifest["image_size"] == 16
    assert manifest["source"] == str(src.resolve())


def test_submit_rejects_bad_spec_before_submitting(tmp_path, local_lake):
    spec = tmp_path / "bad.yaml"
    spec.write_text("kind: score\ndataset: d\nmodel: m\nactorz: 2\n")
    proc = run_cli("submit", str(spec), "--lake", local_lake, check=False)
    assert proc.returncode == 2
    assert "did you mean 'actors'" in proc.stderr


def test_shipped_specs_validate():
    from medray.jobs.specfile import load_spec_file

    for name in (
        "nightly-score.yaml",
        "retrain-chexnet.yaml",
        "stage-chestxray14.yaml",
        "stage-pneumoniamnist.yaml",
    ):
        kind, values = load_spec_file(ROOT / "configs" / name, [], None)
        assert kind in ("stage", "train", "score")


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """A second local cluster with a head and two worker raylets, under its own MEDRAY_HOME."""
    home = Path(f"/tmp/medray-3n-{uuid.uuid4().hex[:6]}")  # noqa: S108 - short socket paths
    prices = ROOT / "configs" / "cluster" / "prices.yaml"
    env = {"MEDRAY_HOME": str(home), "MEDRAY_PRICES": str(prices)}
    info = cli_json("cluster", "up", "--nodes", "3", "--num-cpus", "1", env=env)
    yield env, info
    run_cli("cluster", "down", env=env, check=False)


def _tiny_model(lake: str) -> None:
    from medray.cluster.store import registry
    from medray.cluster.store.lake import Lake
    from medray.workers.models import ModelCard, build_model

    model = build_model("small_cnn", 16, 1, 2, False)
    path = Path(lake).parent / "tiny.keras"
    model.save(path)
    registry.register(
        Lake(lake),
        str(path),
        ModelCard(
            name="tiny",
            labels=["normal", "pneumonia"],
            multi_label=False,
            input_size=16,
            channels=1,
            arch="small_cnn",
        ),
    )


def test_three_node_cluster_spreads_actors_and_history_survives_restart(three_nodes, tmp_path):
    env, info = three_nodes
    assert info["nodes"] == 3
    status = cli_json("cluster", "status", env=env)
    assert status["nodes"] == 3 and status["cpus"] == 3
    lake = str(tmp_path / "lake")
    src = small_npz(tmp_path / "mini.npz", {"train": 200, "val": 20, "test": 20})
    cli_json(
        "stage",
        str(src),
        "--dataset",
        "spread",
        "--image-size",
        "16",
        "--shard-mb",
        "0.2",
        "--lake",
        lake,
        env=env,
    )
    _tiny_model(lake)
    scored = cli_json(
        "score",
        "--dataset",
        "spread",
        "--model",
        "tiny",
        "--actors",
        "3",
        "--cpus-per-actor",
        "1",
        "--batch-size",
        "16",
        "--lake",
        lake,
        env=env,
    )
    marker = json.loads((Path(lake) / "runs" / scored["run_id"] / "_COMMITTED.json").read_text())
    assert len({a["node_id"] for a in marker["actors"]}) >= 2, marker["actors"]
    usage = scored["usage"]  # the job's own accounting sees the same spread
    assert usage["actor_nodes"].get("MapWorker(MapBatches(ScorerActor))", 0) >= 2, usage
    assert usage["cpu_seconds"] > 0
    # cost per 1,000 images from the price table, in the job's record
    record = cli_json("jobs", "show", scored["job_id"], "--lake", lake, env=env)
    assert record["status"] == "SUCCEEDED"
    assert record["result"]["cost"]["per_1000_images"] > 0
    assert record["run_id"] == scored["run_id"] and record["model_version"] == 1
    assert any("committed run" in line for line in record["log_tail"])

    # restart the cluster: the Ray head forgets its jobs, the lake's history does not
    run_cli("cluster", "down", env=env)
    cli_json("cluster", "up", "--nodes", "1", "--num-cpus", "1", env=env)
    rows = cli_json("jobs", "list", "--lake", lake, env=env)
    ids = {r["job_id"]: r for r in rows}
    assert scored["job_id"] in ids and ids[scored["job_id"]]["status"] == "SUCCEEDED"
    assert {r["kind"] for r in rows} >= {"stage", "score"}
    live = run_cli("jobs", "status", scored["job_id"], env=env, check=False)
    assert live.returncode == 2  # the new head does not know it; only the lake does
    only = cli_json("jobs", "list", "--lake", lake, "--kind", "score", "--dataset", "spread:1",
                    "--model", "tiny", env=env)
    assert [r["job_id"] for r in only] == [scored["job_id"]]
    assert cli_json("jobs", "list", "--lake", lake, "--model", "tiny:2", env=env) == []

    # the run's report summary carries what scoring it cost, per 1,000 images
    reported = cli_json("report", scored["run_id"], "--lake", lake, "--n-boot", "50", env=env)
    summary = reported["summary"]
    assert summary["score_jobs"] == 1
    assert summary["cost_per_1000_images"] == pytest.approx(
        record["result"]["cost"]["per_1000_images"], rel=1e-3, abs=2e-6)  # 6-decimal figures
    assert summary["cpu_seconds"] == pytest.approx(usage["cpu_seconds"], rel=1e-2)


def test_cluster_config_wraps_ray_up_and_fails_cleanly_without_cloud(tmp_path):
    bad = tmp_path / "nope.yaml"
    bad.write_text("cluster_name: x\nprovider: {type: nonexistent}\n")
    proc = run_cli("cluster", "up", "--config", str(bad), check=False, timeout=120)
    assert proc.returncode != 0


def test_prices_table_parses():
    from medray.cluster.infra.costs import cost, load_prices

    prices = load_prices(str(ROOT / "configs" / "cluster" / "prices.yaml"))
    assert prices and "head" in prices
    usage = {"by_node_type": {"head": {"cpu_seconds": 3600.0, "gpu_seconds": 0.0}}}
    assert cost(usage, prices, 1000)["per_1000_images"] == pytest.approx(prices["head"]["cpu_hour"])
    assert cost(usage, None, 1000) is None
    assert json.dumps(cost(usage, prices, None))
    os.environ.pop("MEDRAY_PRICES", None)
