"""stage -> train -> score -> report through the real CLI, on the real S3 lake and a real
local Ray cluster; predictions are read back with plain pyarrow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from tests.support.cli import cli_json, run_cli
from tests.support.data import small_npz

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, s3_server, ray_cluster):
    lake = f"s3://{s3_server['bucket']}/e2e"
    src = small_npz(
        tmp_path_factory.mktemp("src") / "small.npz", {"train": 600, "val": 120, "test": 120}
    )
    staged = cli_json(
        "stage",
        str(src),
        "--dataset",
        "pneu",
        "--image-size",
        "28",
        "--label-names",
        "normal,pneumonia",
        "--lake",
        lake,
    )
    trained = cli_json(
        "train", "--dataset", "pneu", "--model", "cnn", "--epochs", "2", "--lake", lake
    )
    scored = cli_json(
        "score", "--dataset", "pneu", "--model", "cnn:1", "--split", "test", "--lake", lake
    )
    reported = cli_json("report", scored["run_id"], "--lake", lake)
    return {
        "lake": lake,
        "src": src,
        "staged": staged,
        "trained": trained,
        "scored": scored,
        "reported": reported,
    }


def _s3(home: Path, endpoint: str) -> pafs.S3FileSystem:
    creds = json.loads((home / "lake" / "credentials.json").read_text())
    return pafs.S3FileSystem(
        access_key=creds["access_key"],
        secret_key=creds["secret_key"],
        endpoint_override=endpoint.split("//")[1],
        scheme="http",
        region="us-east-1",
    )


def test_stage_reports_unique_images_and_version(pipeline):
    staged = pipeline["staged"]
    assert staged["dataset"] == "pneu" and staged["version"] == 1
    assert staged["images"] + staged["duplicates"] == 840
    assert staged["errors"] == 0


def test_train_registers_version_with_card(pipeline):
    trained = pipeline["trained"]
    assert (trained["model"], trained["version"]) == ("cnn", 1)
    auc = trained["metrics"]["val_mean_auroc"]
    assert 0.5 < auc <= 1.0  # two epochs on 600 images: better than chance
    card = json.loads(run_cli("models", "show", "cnn:1", "--lake", pipeline["lake"]).stdout)
    assert card["labels"] == ["normal", "pneumonia"]
    assert card["input_size"] == 28 and card["channels"] == 1
    assert set(card["thresholds"]) == {"normal", "pneumonia"}
    assert card["dataset"] == "pneu" and card["dataset_version"] == 1


def test_predictions_read_back_with_plain_pyarrow(pipeline, medray_home, s3_server):
    scored = pipeline["scored"]
    fs = _s3(medray_home, s3_server["endpoint"])
    base = scored["predictions_uri"].removeprefix("s3://")
    marker = json.loads(fs.open_input_stream(base.rsplit("/", 1)[0] + "/_COMMITTED.json").read())
    tables = [
        pq.read_table(f"{base.rsplit('/', 1)[0]}/{f}", filesystem=fs) for f in marker["files"]
    ]
    import pyarrow as pa

    preds = pa.concat_tables(tables)
    assert preds.num_rows == scored["images"] == 120 - 0  # every test image once
    assert len(set(preds.column("image_id").to_pylist())) == preds.num_rows
    for col in (
        "image_id",
        "source_uri",
        "true_labels",
        "score_normal",
        "score_pneumonia",
        "predicted_labels",
        "model",
        "model_version",
        "run_id",
        "scored_at",
    ):
        assert col in preds.column_names
    total = pc.add(preds.column("score_normal"), preds.column("score_pneumonia")).to_numpy()
    np.testing.assert_allclose(total, 1.0, atol=1e-4)
    assert set(preds.column("run_id").to_pylist()) == {scored["run_id"]}
    assert set(preds.column("model_version").to_pylist()) == {1}


def test_report_auroc_matches_sklearn(pipeline, medray_home, s3_server):
    fs = _s3(medray_home, s3_server["endpoint"])
    scored = pipeline["scored"]
    run_dir = scored["predictions_uri"].removeprefix("s3://").rsplit("/", 1)[0]
    marker = json.loads(fs.open_input_stream(f"{run_dir}/_COMMITTED.json").read())
    import pyarrow as pa

    preds = pa.concat_tables(
        [pq.read_table(f"{run_dir}/{f}", filesystem=fs) for f in marker["files"]]
    )
    y = np.array([1 if "pneumonia" in t else 0 for t in preds.column("true_labels").to_pylist()])
    expected = roc_auc_score(y, preds.column("score_pneumonia").to_numpy())
    got = pipeline["reported"]["metrics"]["pneumonia"]["auroc"]
    assert got == pytest.approx(expected, abs=1e-6)
    assert pq.read_table(f"{run_dir}/report/per_label_metrics.parquet", filesystem=fs).num_rows == 2


def test_predict_prints_label_image_lines(pipeline, tmp_path):
    from PIL import Image

    d = np.load(pipeline["src"])
    path = tmp_path / "xray.png"
    Image.fromarray(d["test_images"][0]).save(path)
    out = run_cli("predict", "--model", "cnn", str(path), "--lake", pipeline["lake"]).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 2
    import re

    parsed = [re.fullmatch(r"(\w+) \(score = (\d\.\d{5})\)", line) for line in lines]
    assert all(parsed), lines
    scores = [float(m.group(2)) for m in parsed]
    assert scores == sorted(scores, reverse=True)
    assert {m.group(1) for m in parsed} == {"normal", "pneumonia"}


def test_jobs_list_shows_history(pipeline):
    rows = cli_json("jobs", "list", "--lake", pipeline["lake"])
    kinds = {r["kind"] for r in rows if r["status"] == "SUCCEEDED"}
    assert {"stage", "train", "score", "report"} <= kinds


def test_bad_reference_exits_2_before_submitting(pipeline):
    proc = run_cli(
        "score",
        "--dataset",
        "pneu",
        "--model",
        "nosuchmodel",
        "--lake",
        pipeline["lake"],
        check=False,
    )
    assert proc.returncode == 2
    assert "no model 'nosuchmodel'" in proc.stderr
