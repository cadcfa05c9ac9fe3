"""`medray report` end to end on a real local Ray cluster and the embedded S3 lake: stage a
folder of PNGs whose names group images by patient, register two tiny models, score the dataset
with each, then report on run A with run B as drift reference and comparison, and one Grad-CAM
heatmap per label. Every number is recomputed with scikit-learn from the committed predictions.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from scipy import stats
from sklearn import metrics as skm

from tests.support.cli import cli_json, run_cli
from tests.support.paths import DATA

pytestmark = pytest.mark.integration

LABELS = ["normal", "pneumonia"]
THRESHOLDS = {"normal": 0.48, "pneumonia": 0.52}
PATIENTS_PER_CLASS, IMAGES_PER_PATIENT = 20, 3


def _folder_source(root: Path) -> Path:
    """root/<label>/p<k>_nohash_<i>.png: staging keys a patient by the name before _nohash_."""
    if not DATA.exists():
        pytest.skip(f"{DATA} is missing")
    d = np.load(DATA)
    images, labels = d["test_images"], d["test_labels"].ravel()
    rng = np.random.default_rng(0)
    n = PATIENTS_PER_CLASS * IMAGES_PER_PATIENT
    for c, label in enumerate(LABELS):
        pick = rng.choice(np.flatnonzero(labels == c), n, replace=False)
        (root / label).mkdir(parents=True)
        for i, idx in enumerate(pick):
            patient, shot = divmod(i, IMAGES_PER_PATIENT)
            name = f"{label}{patient}_nohash_{shot}.png"  # a patient of each class of its own
            Image.fromarray(images[idx]).save(root / label / name)
    return root


def _register(lake, tmp: Path, name: str, seed: int) -> None:
    from medray.cluster.store import registry
    from medray.workers.models import ModelCard, build_model

    model = build_model("small_cnn", 28, 1, len(LABELS), multi_label=False, seed=seed)
    path = tmp / f"{name}.keras"
    model.save(path)
    card = ModelCard(name=name, labels=LABELS, multi_label=False, input_size=28, channels=1,
                     arch="small_cnn", thresholds=dict(THRESHOLDS), source="test")
    registry.register(lake, str(path), card)


@pytest.fixture(scope="module")
def reported(tmp_path_factory, s3_server, ray_cluster):
    from medray.cluster.store.lake import Lake

    tmp = tmp_path_factory.mktemp("report")
    lake_uri = f"s3://{s3_server['bucket']}/report-{uuid.uuid4().hex[:8]}"
    src = _folder_source(tmp / "src")
    clock = [time.monotonic()]
    cli_json("stage", str(src), "--dataset", "rep", "--image-size", "28", "--lake", lake_uri)
    lake = Lake(lake_uri)
    _register(lake, tmp, "ma", seed=0)
    _register(lake, tmp, "mb", seed=1)
    clock.append(time.monotonic())
    run_a = cli_json("score", "--dataset", "rep", "--model", "ma:1", "--lake", lake_uri)
    run_b = cli_json("score", "--dataset", "rep", "--model", "mb:1", "--lake", lake_uri)
    clock.append(time.monotonic())
    result = cli_json("report", run_a["run_id"], "--reference", run_b["run_id"], "--compare",
                      run_b["run_id"], "--heatmaps", "1", "--n-boot", "300", "--lake", lake_uri)
    clock.append(time.monotonic())
    # seen with pytest -s: where the module's time goes
    stage, score, report = np.diff(clock)
    print(f"TIMING stage+register {stage:.1f}s, 2 scores {score:.1f}s, "  # noqa: T201
          f"report {report:.1f}s")
    return {"lake": lake, "uri": lake_uri, "a": run_a["run_id"], "b": run_b["run_id"],
            "result": result}


def _committed(lake, run_id: str) -> pa.Table:
    """The run's predictions, read only from the files its commit marker lists."""
    marker = lake.read_json(f"runs/{run_id}/_COMMITTED.json")
    return pa.concat_tables([lake.read_parquet(f"runs/{run_id}/{f}") for f in marker["files"]])


def _truth(preds: pa.Table, label: str) -> np.ndarray:
    return np.array([label in t for t in preds.column("true_labels").to_pylist()], dtype=int)


def test_json_metrics_match_sklearn_on_committed_predictions(reported):
    preds = _committed(reported["lake"], reported["a"])
    out = reported["result"]
    assert out["run_id"] == reported["a"]
    assert set(out["metrics"]) == set(LABELS)
    assert preds.num_rows == 2 * PATIENTS_PER_CLASS * IMAGES_PER_PATIENT
    for label in LABELS:
        m = out["metrics"][label]
        y = _truth(preds, label)
        s = preds.column(f"score_{label}").to_numpy().astype(np.float64)
        pred = (s >= THRESHOLDS[label]).astype(int)
        assert m["images"] == preds.num_rows and m["positives"] == int(y.sum())
        assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-6)
        assert m["auprc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-6)
        assert m["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=np.nan), abs=1e-9)
        assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred), abs=1e-9)
        assert m["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0),
                                                 abs=1e-9)
        assert m["threshold"] == THRESHOLDS[label]
        assert m["positive_rate"] == pytest.approx(pred.mean(), abs=1e-12)
        assert m["auroc_lo"] <= m["auroc"] <= m["auroc_hi"]
        # drift against run B, recomputed from B's committed scores
        ref = _committed(reported["lake"], reported["b"]).column(f"score_{label}")
        ks = stats.ks_2samp(ref.to_numpy().astype(np.float64), s)
        assert m["ks"] == pytest.approx(ks.statistic, abs=1e-12)
        assert isinstance(m["drifted"], bool)


def test_tables_html_heatmaps_and_commit_marker(reported):
    from medray.workers.drift import psi

    lake, a, b = reported["lake"], reported["a"], reported["b"]
    base = f"runs/{a}/report"
    out = reported["result"]
    assert out["report_uri"] == lake.full_uri(base)
    assert out["html_uri"] == lake.full_uri(f"{base}/report.html")
    summary = lake.read_parquet(f"{base}/summary.parquet").to_pylist()[0]
    # every image has a patient key (from the file names): CIs resample the 40 patients
    assert summary["ci_unit"] == "patient" == out["summary"]["ci_unit"]
    assert summary["patients"] == 2 * PATIENTS_PER_CLASS
    per_label = lake.read_parquet(f"{base}/per_label_metrics.parquet").to_pylist()
    assert [r["label"] for r in per_label] == LABELS
    for r in per_label:
        assert r["auroc"] == pytest.approx(out["metrics"][r["label"]]["auroc"], abs=1e-12)
        assert r["tp"] + r["fp"] + r["tn"] + r["fn"] == r["with_truth"]
    thresholds = lake.read_parquet(f"{base}/thresholds.parquet").to_pylist()
    assert {(t["label"], t["threshold"], t["source"]) for t in thresholds} == \
        {(lab, THRESHOLDS[lab], "model card") for lab in LABELS}
    preds_a, preds_b = _committed(lake, a), _committed(lake, b)
    drift = lake.read_parquet(f"{base}/drift.parquet").to_pylist()
    compare = lake.read_parquet(f"{base}/compare.parquet").to_pylist()
    order_b = {iid: i for i, iid in enumerate(preds_b.column("image_id").to_pylist())}
    take_b = [order_b[i] for i in preds_a.column("image_id").to_pylist()]
    for label, d, c in zip(LABELS, drift, compare, strict=True):
        sa = preds_a.column(f"score_{label}").to_numpy().astype(np.float64)
        sb = preds_b.column(f"score_{label}").to_numpy().astype(np.float64)
        assert d["label"] == label and d["psi"] == pytest.approx(psi(sb, sa), abs=1e-12)
        y = _truth(preds_a, label)
        assert c["paired_images"] == preds_a.num_rows
        want = skm.roc_auc_score(y, sa) - skm.roc_auc_score(y, sb[take_b])
        assert c["auroc_diff"] == pytest.approx(want, abs=1e-6)
        assert c["auroc_diff_lo"] <= c["auroc_diff"] <= c["auroc_diff_hi"]
    heat = lake.list_files(f"{base}/heatmaps", recursive=True)
    pngs = [f for f in heat if f.endswith(".png")]
    assert len(pngs) == len(LABELS)
    for f in pngs:
        img = Image.open(io.BytesIO(lake.read_bytes(f)))
        assert img.format == "PNG" and img.size == (224, 224) and img.mode == "RGB"
    html = lake.read_bytes(f"{base}/report.html").decode()
    assert html.count('src="data:image/png;base64,') == len(LABELS)
    assert html.count('src="data:image/svg+xml;base64,') == 4 * len(LABELS)
    marker = lake.read_json(f"{base}/_COMMITTED.json")
    assert marker["run_id"] == a and marker["heatmaps"] == len(LABELS)
    json.dumps(marker, allow_nan=False)
    print("TIMING report phases", marker["timings"])  # noqa: T201 - seen with pytest -s


def test_terminal_table_names_the_columns(reported):
    proc = run_cli("report", reported["b"], "--n-boot", "0", "--lake", reported["uri"])
    header = proc.stdout.strip().splitlines()[0].split()
    assert header[:6] == ["label", "images", "positives", "auroc", "auroc_lo", "auroc_hi"]
    assert "f1" in header and "positive_rate" in header
    rows = [line.split() for line in proc.stdout.strip().splitlines()[1:3]]
    assert [r[0] for r in rows] == LABELS
    assert all(r[4] == "-" for r in rows)  # --n-boot 0: no interval, printed as '-'


# ------------------------------------------------------------------------------- issue 15
def test_operating_points_ece_interval_and_the_cards_evaluation(reported):
    """The report gives the rates at the card's threshold with patient-level intervals, ECE
    with an interval, and records itself in the model version's card."""
    import jsonschema

    from medray.workers.model_card import SCHEMA

    lake, a = reported["lake"], reported["a"]
    base = f"runs/{a}/report"
    preds = _committed(lake, a)
    operating = lake.read_parquet(f"{base}/operating_points.parquet").to_pylist()
    assert [(r["label"], r["rule"], r["primary"]) for r in operating] == [
        (lab, "model card", True) for lab in LABELS]
    for r in operating:
        y = _truth(preds, r["label"])
        pred = preds.column(f"score_{r['label']}").to_numpy() >= r["threshold"]
        assert r["threshold"] == THRESHOLDS[r["label"]]
        if (~pred).any():
            assert r["npv"] == pytest.approx(np.mean(y[~pred] == 0))
        else:  # nothing called negative: NPV is undefined, stored as null
            assert r["npv"] is None
        assert r["sensitivity"] == pytest.approx(np.mean(pred[y == 1]))
        for m in ("sensitivity", "specificity", "ppv", "npv", "f1"):
            if r[m] is not None:
                assert r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"]
    for r in lake.read_parquet(f"{base}/per_label_metrics.parquet").to_pylist():
        assert r["ece_lo"] <= r["ece"] <= r["ece_hi"]
    card = lake.read_json("models/ma/1/card.json")
    jsonschema.validate(card, SCHEMA)
    entry = card["evaluations"][a]
    assert entry["with_truth"] == preds.num_rows and entry["dataset"] == "rep"
    assert [r["label"] for r in entry["labels"]] == LABELS
    html = lake.read_bytes(f"{base}/report.html").decode()
    assert "<h2>Operating points</h2>" in html and "<h2>Model card: ma:1</h2>" in html


def _register_users_model(lake_uri: str, tmp: Path, name: str, layers: list) -> None:
    """A user's own Keras model, saved to .keras and registered with `medray models
    register`, as issue 15 reports it."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), *layers])
    path = tmp / f"{name}.keras"
    model.save(path)
    cli_json("models", "register", str(path), "--name", name, "--labels", ",".join(LABELS),
             "--lake", lake_uri)


def test_heatmaps_for_a_users_sequential_model_and_a_line_for_one_without_a_map(
        reported, tmp_path):
    import keras

    uri, lake = reported["uri"], reported["lake"]
    _register_users_model(uri, tmp_path, "seq", [
        keras.layers.Conv2D(8, 3, activation="relu", name="user_conv"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2, activation="softmax")])
    _register_users_model(uri, tmp_path, "flat", [
        keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    for name, expected in (("seq", 2 * len(LABELS)), ("flat", 0)):
        run = cli_json("score", "--dataset", "rep", "--model", f"{name}:1", "--lake", uri)
        proc = run_cli("report", run["run_id"], "--heatmaps", "2", "--n-boot", "50",
                       "--lake", uri, "--json")
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        summary = out["summary"]
        assert summary["heatmaps"] == expected
        base = f"runs/{run['run_id']}/report"
        pngs = [f for f in lake.list_files(f"{base}/heatmaps", recursive=True)
                if f.endswith(".png")]
        assert len(pngs) == expected
        html = lake.read_bytes(f"{base}/report.html").decode()
        if expected:
            assert summary["heatmaps_note"] is None
            heat = lake.read_parquet(f"{base}/heatmaps.parquet").to_pylist()
            assert {h["layer"] for h in heat} == {"user_conv"}
        else:  # the rest of the report is there, with one line saying why no heatmaps
            assert "no convolutional feature map" in summary["heatmaps_note"]
            assert html_escape(summary["heatmaps_note"]) in html
            assert set(out["metrics"]) == set(LABELS)
