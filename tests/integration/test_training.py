"""Training on the real local Ray cluster (2 CPUs) and the real S3 lake, through the CLI:
two workers on uneven shards, multi-label from a CSV, resume after a crash, the head-mode
feature cache, --weights from a file, ImageNet without a network."""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from tests.support.cli import cli_json, run_cli
from tests.support.data import small_npz
from tests.support.paths import DATA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def lake(s3_server, ray_cluster) -> str:
    return f"s3://{s3_server['bucket']}/train-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def p32(lake, tmp_path_factory) -> dict:
    """200 images at 32 px (the smallest size for MobileNetV2) in several shards."""
    src = small_npz(tmp_path_factory.mktemp("p32") / "p32.npz", {"train": 160, "val": 40},
                    seed=2)
    return cli_json("stage", str(src), "--dataset", "p32", "--image-size", "32",
                    "--label-names", "normal,pneumonia", "--shard-mb", "0.06", "--lake", lake)


@pytest.fixture(scope="module")
def pneu(lake, tmp_path_factory) -> dict:
    """~400 PneumoniaMNIST images at 28 px in several small, uneven shards."""
    src = small_npz(tmp_path_factory.mktemp("pneu") / "pneu.npz",
                    {"train": 302, "val": 80, "test": 40}, seed=1)
    staged = cli_json("stage", str(src), "--dataset", "pneu", "--image-size", "28",
                      "--label-names", "normal,pneumonia", "--shard-mb", "0.1", "--lake", lake)
    assert staged["shards"] >= 3
    return staged


def _lake(uri: str):
    from medray.cluster.store.lake import Lake

    return Lake(uri)


def _labelled_train_rows(lake: str, dataset: str) -> int:
    from medray.cluster.store import catalog

    lk = _lake(lake)
    _, _, manifest = catalog.resolve(lk, dataset)
    total = 0
    for shard in manifest["shards"]:
        t = lk.read_parquet(shard["path"], columns=["split", "labels"])
        total += int(pc.sum(pc.and_(pc.equal(t.column("split"), "train"),
                                    pc.is_valid(t.column("labels")))).as_py() or 0)
    return total


def _card(lake: str, model: str, version: int) -> dict:
    return json.loads(_lake(lake).read_bytes(f"models/{model}/{version}/card.json"))


def _keras_model(lake: str, model: str, version: int):
    from medray.workers.models import load_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.keras"
        path.write_bytes(_lake(lake).read_bytes(f"models/{model}/{version}/model.keras"))
        return load_model(str(path))


# --------------------------------------------------------------------------------- 2 workers
def test_two_workers_take_equal_shares_of_uneven_shards(lake, pneu):
    proc = run_cli("train", "--dataset", "pneu", "--model", "two", "--workers", "2",
                   "--cpus-per-worker", "0.5", "--epochs", "2", "--batch-size", "32",
                   "--lake", lake, "--json", "--verbose")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (res["model"], res["version"]) == ("two", 1)
    # progress streamed from the workers through the job logs to the CLI
    assert re.search(r"epoch 2/2 done: loss [\d.]+, val loss [\d.]+, val mean AUROC [\d.]+",
                     proc.stderr)
    assert "images/s" in proc.stderr

    rows = _labelled_train_rows(lake, "pneu")
    lk = _lake(lake)
    run_dir = f"models/two/_training/{res['training_id']}"
    ranks = [json.loads(lk.read_bytes(p)) for p in lk.list_files(f"{run_dir}/ranks")]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["world"] == 2 and r["plan"]["local_batch"] == 16
        for epoch in ("1", "2"):
            # every worker ran the same steps: its half of the rows, never the full copy
            assert r["epochs"][epoch]["steps"] == rows // 32
            assert r["epochs"][epoch]["batches"] == r["epochs"][epoch]["steps"]
    card = _card(lake, "two", 1)
    assert card["hyperparameters"]["workers"] == 2
    assert [h["epoch"] for h in card["metrics"]["history"]] == [1, 2]
    for epoch in (1, 2):
        assert lk.exists(f"{run_dir}/checkpoints/epoch-{epoch:04d}/state.json")

    # TensorBoard events in the lake hold the same validation AUROC as the card
    from tensorflow.python.summary.summary_iterator import summary_iterator

    events = lk.list_files(f"{run_dir}/tensorboard", recursive=True)
    assert events
    seen = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, rel in enumerate(events):
            path = Path(tmp) / f"ev{i}"
            path.write_bytes(lk.read_bytes(rel))
            for event in summary_iterator(str(path)):
                for value in event.summary.value:
                    if value.tag == "val/mean_auroc":
                        import tensorflow as tf

                        seen[event.step] = float(tf.make_ndarray(value.tensor))
    history = {h["epoch"]: h["val_mean_auroc"] for h in card["metrics"]["history"]}
    assert seen == pytest.approx(history, abs=1e-6)


# ------------------------------------------------------------------------------ multi-label
def _csv_source(root: Path, n: int = 200) -> Path:
    """PNGs from PneumoniaMNIST with two findings: Pneumonia (the real label) and Bright
    (the image was brightened), ChestX-ray14 style: 'A|B' or 'No Finding'."""
    from PIL import Image

    d = np.load(DATA)
    rng = np.random.default_rng(3)
    idx = rng.choice(len(d["train_labels"]), n, replace=False)
    lines = ["Image Index,Finding Labels,Patient ID"]
    for k, i in enumerate(idx):
        img = d["train_images"][i].astype(np.int32)
        findings = ["Pneumonia"] if d["train_labels"][i][0] == 1 else []
        if k % 3 == 0:
            img = np.minimum(255, img + 90)
            findings.append("Bright")
        name = f"img_{k:04d}.png"
        Image.fromarray(img.astype(np.uint8)).save(root / name)
        lines.append(f"{name},{'|'.join(findings) or 'No Finding'},{k}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def test_multi_label_csv_trains_with_chexnet_weights(lake, tmp_path):
    csv_path = _csv_source(tmp_path)
    staged = cli_json("stage", str(csv_path), "--dataset", "cxr", "--format", "csv",
                      "--image-size", "28", "--val-percent", "20", "--test-percent", "10",
                      "--lake", lake)
    assert staged["errors"] == 0
    res = cli_json("train", "--dataset", "cxr", "--model", "multi", "--epochs", "1",
                   "--batch-size", "32", "--lake", lake)
    card = _card(lake, "multi", res["version"])
    assert card["multi_label"] is True and card["labels"] == ["Bright", "Pneumonia"]
    assert set(card["thresholds"]) == {"Bright", "Pneumonia"}
    assert set(card["metrics"]["val_auroc"]) == {"Bright", "Pneumonia"}
    assert all(0.0 <= v <= 1.0 for v in card["metrics"]["val_auroc"].values())
    # CheXNet weights recomputed here from the staged train split
    from medray.cluster.store import catalog

    lk = _lake(lake)
    _, _, manifest = catalog.resolve(lk, "cxr")
    names = []
    for shard in manifest["shards"]:
        t = lk.read_parquet(shard["path"], columns=["split", "labels"])
        names += t.filter(pc.equal(t.column("split"), "train")).column("labels").to_pylist()
    weights = card["hyperparameters"]["loss_weights"]
    for label in ("Bright", "Pneumonia"):
        pos = sum(label in n for n in names) / len(names)
        assert weights[label]["positive"] == pytest.approx(1 - pos, abs=1e-6)
        assert weights[label]["negative"] == pytest.approx(pos, abs=1e-6)
    # the model gives independent sigmoid scores per finding
    model = _keras_model(lake, "multi", res["version"])
    out = np.asarray(model(np.zeros((2, 28, 28, 1), np.float32), training=False))
    assert out.shape == (2, 2) and not np.allclose(out.sum(axis=1), 1.0)


# ----------------------------------------------------------------------------------- resume
def test_resume_after_a_crash_continues_from_the_checkpoint(lake, pneu):
    args = ("train", "--dataset", "pneu", "--model", "res", "--epochs", "2", "--batch-size",
            "32", "--run-id", "res-run", "--lake", lake)
    crashed = run_cli(*args, check=False, env={"MEDRAY_FAULT": "train_exit_after_epoch:1"})
    assert crashed.returncode == 1, crashed.stderr[-2000:]
    lk = _lake(lake)
    ckpt = "models/res/_training/res-run/checkpoints"
    # the crash came after epoch 1 was committed and before anything was registered
    assert lk.read_json(f"{ckpt}/latest.json")["epoch"] == 1
    state1 = lk.read_json(f"{ckpt}/epoch-0001/state.json")
    first_job = state1["jobs"][0]
    assert first_job in crashed.stderr
    assert not lk.exists("models/res/_training/res-run/final/result.json")
    assert lk.list_dirs("models/res") == ["_training"]  # no version registered

    again = run_cli(*args, check=False)  # same id without --resume: refused, not overwritten
    assert again.returncode == 2 and "add --resume" in again.stderr

    resumed = run_cli(*args, "--resume", "--json", "--verbose")
    res = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert "resumed from the checkpoint of epoch 1" in resumed.stderr
    assert "epoch 2/2 done" in resumed.stderr and "epoch 1/2 done" not in resumed.stderr
    card = _card(lake, "res", res["version"])
    history = card["metrics"]["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == state1["history"][0]  # epoch 1 is the crashed job's, not redone
    assert history[0]["job_id"] == first_job and history[1]["job_id"] == res["job_id"]
    assert card["training"]["jobs"] == [first_job, res["job_id"]]
    assert card["training"]["id"] == "res-run" and card["training"]["resumed"] is True

    # resuming a finished training registers nothing new
    twice = cli_json(*args, "--resume")
    assert twice["version"] == res["version"]
    assert sorted(v for v in lk.list_dirs("models/res") if v.isdigit()) == [str(res["version"])]


# ------------------------------------------------------------------------- head-mode cache
def test_head_mode_caches_backbone_features_and_reuses_them(lake, p32):
    n_shards = p32["shards"]
    assert n_shards >= 2
    head = ("train", "--dataset", "p32", "--arch", "mobilenet_v2", "--mode", "head",
            "--epochs", "1", "--batch-size", "32", "--lake", lake)
    first = cli_json(*head, "--model", "head1")
    assert first["features"]["computed_shards"] == n_shards
    assert first["features"]["reused_shards"] == 0
    lk = _lake(lake)
    key = first["features"]["key"]
    markers = sorted(p for p in lk.list_files(f"features/{key}", recursive=True)
                     if p.endswith(".json") and "/_" not in p)
    assert len(markers) == n_shards
    before = {p: lk.read_bytes(p) for p in markers}
    stamps = {p: lk.fs.get_file_info(lk.path(p.removesuffix(".json") + ".parquet")).mtime
              for p in markers}

    second = cli_json(*head, "--model", "head2")
    assert second["features"]["key"] == key
    assert (second["features"]["computed_shards"], second["features"]["reused_shards"]) == (
        0, n_shards)
    # the backbone did not run again: no new computation record, files untouched
    events = lk.list_files(f"features/{key}/_events")
    assert [Path(e).stem for e in events] == [first["job_id"]]
    assert {p: lk.read_bytes(p) for p in markers} == before
    assert all(json.loads(b)["job_id"] == first["job_id"] for b in before.values())
    assert {p: lk.fs.get_file_info(lk.path(p.removesuffix(".json") + ".parquet")).mtime
            for p in markers} == stamps

    # the registered model's backbone is the one that produced the cached features
    from medray.workers.models import backbone_of, feature_extractor

    model = _keras_model(lake, "head2", second["version"])
    assert backbone_of(model) is not None
    table = lk.read_parquet(markers[0].removesuffix(".json") + ".parquet")
    ids = table.column("image_id").to_pylist()[:8]
    cached = np.stack([np.asarray(v, np.float32) for v in
                       table.column("features").to_pylist()[:8]])
    from medray.cluster.store import catalog

    _, _, manifest = catalog.resolve(lk, "p32")
    pixels = {}
    for shard in manifest["shards"]:
        t = lk.read_parquet(shard["path"], columns=["image_id", "pixels"])
        pixels.update(zip(t.column("image_id").to_pylist(), t.column("pixels").to_pylist(),
                          strict=True))
    x = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(32, 32, 1) for i in ids])
    fresh = np.asarray(feature_extractor(model)(x.astype(np.float32), training=False))
    np.testing.assert_allclose(fresh, cached, rtol=1e-4, atol=1e-5)
    card = _card(lake, "head2", second["version"])
    assert card["hyperparameters"]["mode"] == "head"
    assert card["training"]["feature_cache"]["reused_shards"] == n_shards


# ------------------------------------------------------------------------- weights from file
def test_initial_weights_come_from_a_keras_file(lake, pneu, tmp_path):
    from medray.workers.models import build_model

    source = build_model("small_cnn", 28, 1, 2, False, seed=123)
    path = tmp_path / "start.keras"
    source.save(path)
    res = cli_json("train", "--dataset", "pneu", "--model", "fromfile", "--weights", str(path),
                   "--epochs", "1", "--batch-size", "32", "--learning-rate", "1e-9",
                   "--lake", lake)
    model = _keras_model(lake, "fromfile", res["version"])
    seeded = build_model("small_cnn", 28, 1, 2, False, seed=0)  # what training starts from
    for layer in ("conv0", "conv1", "conv2", "scores"):
        got = model.get_layer(layer).get_weights()[0]
        np.testing.assert_allclose(got, source.get_layer(layer).get_weights()[0], atol=1e-5)
        assert np.abs(got - seeded.get_layer(layer).get_weights()[0]).max() > 1e-2
    card = _card(lake, "fromfile", res["version"])
    assert card["weights"] == str(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert card["training"]["weights_identity"] == f"file:{digest}"


def test_weights_file_that_does_not_exist_is_bad_input(lake, pneu):
    proc = run_cli("train", "--dataset", "pneu", "--model", "nofile", "--weights",
                   "nowhere/start.keras", "--lake", lake, check=False)
    assert proc.returncode == 2
    assert "no such file here or in the lake" in proc.stderr


# ------------------------------------------------------------------------ ImageNet, offline
def test_imagenet_without_network_is_a_fast_clear_error(lake, p32):
    from medray.cluster.train.weights import imagenet_reachable

    if imagenet_reachable("mobilenet_v2"):
        pytest.skip("this machine can reach (or has cached) the ImageNet weights")
    started = time.monotonic()
    proc = run_cli("train", "--dataset", "p32", "--model", "imnet", "--arch", "mobilenet_v2",
                   "--weights", "imagenet", "--lake", lake, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--weights PATH" in proc.stderr
    assert time.monotonic() - started < 60


# ------------------------------------------------ issue 15: a card a clinician can trust
def test_card_has_calibration_operating_points_and_inference_matches_training(lake, pneu,
                                                                             tmp_path):
    """Through `medray train`: BatchNorm statistics re-estimated every epoch (the registered
    model's inference-mode features match its training-mode ones), the defaults for 28 px
    images (the strong recipe, and temperature scaling with a class-balanced bias) and the
    operating points fitted on validation, validation metrics with intervals, the
    intended use from flags and a card file, and a card that validates against its schema."""
    import jsonschema
    import keras

    from medray.workers import calibration
    from medray.workers.model_card import SCHEMA

    card_file = tmp_path / "card.yaml"
    card_file.write_text("users: radiology researchers\nlimitations:\n"
                         "  - Paediatric images from one hospital.\n")
    proc = run_cli("train", "--dataset", "pneu", "--model", "trust", "--epochs", "3",
                   "--batch-size", "32", "--operating-point",
                   "youden,pneumonia:sensitivity=0.9", "--out-of-scope",
                   "adults; screening without a radiologist", "--card-file", str(card_file),
                   "--lake", lake, "--json", "--verbose")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert re.search(r"calibration on val: temperature \{'normal': '[\d.]+', 'pneumonia'",
                     proc.stderr)
    # --augment-recipe auto and the unset form, resolved for the dataset's 28 px and said so
    assert "augmentation: strong (--augment-recipe auto, for 28 px images)" in proc.stderr
    assert res["augmentation"] == "strong"
    assert ("calibration form: temperature+balanced-bias (the default after the strong "
            "recipe)") in proc.stderr
    assert res["val_ece_before"] is not None and res["val_ece_after"] is not None
    card = _card(lake, "trust", res["version"])
    jsonschema.validate(card, SCHEMA)

    # every epoch re-estimated BatchNorm on training images before it validated
    assert all(h["bn_images"] > 0 for h in card["metrics"]["history"])
    model = _keras_model(lake, "trust", res["version"])
    from medray.cluster.store import catalog

    lk = _lake(lake)
    _, _, manifest = catalog.resolve(lk, "pneu")
    rows = {"train": [], "val": []}
    for shard in manifest["shards"]:
        t = lk.read_parquet(shard["path"], columns=["split", "labels", "pixels"])
        for split, labels, pixels in zip(*(t.column(c).to_pylist() for c in
                                           ("split", "labels", "pixels")), strict=True):
            if split in rows:
                rows[split].append((np.frombuffer(pixels, np.uint8).reshape(28, 28, 1),
                                    "pneumonia" in labels))
    x_train = np.stack([r[0] for r in rows["train"]]).astype(np.float32)
    # full mode augments by default: the layers are in the model (the identity when it
    # scores); BatchNorm's agreement is measured on the plain images, below them
    assert {"aug_crop", "aug_rotate", "aug_brightness"} <= {ly.name for ly in model.layers}
    assert card["hyperparameters"]["augment"] is True
    assert card["hyperparameters"]["augment_recipe"] == "strong"
    assert tuple(model.get_layer("aug_crop").get_config()["height_factor"]) == (-0.25, 0.0)
    last_aug = [ly for ly in model.layers if ly.name.startswith("aug_")][-1]
    feats = keras.Model(last_aug.output, model.get_layer("features").output)
    trained = np.asarray(feats(x_train, training=True))
    served = np.asarray(feats(x_train, training=False))
    # before the fix: 0.9 on the same measure (tests/unit/test_training_unit.py)
    assert np.abs(trained - served).mean() / np.abs(trained).mean() < 0.1

    # calibration: one temperature (softmax) and a bias, fitted on val with both classes
    # weighted equally, never worse than the raw scores in that weighted likelihood
    cal = card["calibration"]
    assert cal["fitted_on"] == "val" and cal["images"] == len(rows["val"])
    assert cal["temperature"]["normal"] == cal["temperature"]["pneumonia"] > 0
    assert cal["asked"] == calibration.BALANCED
    assert cal["form"] == {"normal": calibration.BALANCED, "pneumonia": calibration.BALANCED}
    x_val = np.stack([r[0] for r in rows["val"]]).astype(np.float32)
    y_val = np.array([r[1] for r in rows["val"]])
    raw = np.asarray(model(x_val, training=False))
    calibrated = calibration.apply_card(raw, cal, ["normal", "pneumonia"], False)
    onehot = np.eye(2)[y_val.astype(int)]
    weights = calibration.balanced_weights(onehot)

    def weighted_nll(p: np.ndarray) -> float:
        return float(np.average(-np.log(np.clip((p * onehot).sum(axis=1), 1e-12, 1)),
                                weights=weights))

    assert weighted_nll(calibrated) <= weighted_nll(raw) + 1e-6

    # the operating points hit what they promise on validation, recomputed here
    scores = calibrated[:, 1]
    points = {(p["label"], p["rule"]): p for p in card["operating_points"]}
    assert set(points) == {("normal", "youden"), ("pneumonia", "youden"),
                           ("pneumonia", "sensitivity=0.9")}
    sens90 = points[("pneumonia", "sensitivity=0.9")]
    called = scores >= sens90["threshold"]
    assert called[y_val].mean() >= 0.9
    assert called[y_val].mean() == pytest.approx(sens90["val_sensitivity"], abs=1e-9)
    assert card["thresholds"]["pneumonia"] == points[("pneumonia", "youden")]["threshold"]
    assert res["thresholds"] == card["thresholds"]

    v = card["validation"]["labels"]["pneumonia"]
    assert v["auroc_lo"] <= v["auroc"] <= v["auroc_hi"]
    assert card["validation"]["images"] == len(rows["val"])
    splits = card["training_data"]["splits"]
    assert splits["train"]["images"] == len(rows["train"])
    assert splits["val"]["labels"]["pneumonia"] == int(y_val.sum())
    use = card["intended_use"]
    assert use["primary"].startswith("Research use only")
    assert use["out_of_scope"] == ["adults", "screening without a radiologist"]
    assert use["users"] == "radiology researchers"
    assert card["limitations"][0] == "Paediatric images from one hospital."

    shown = run_cli("models", "show", f"trust:{res['version']}", "--text", "--lake", lake)
    assert "## Operating points" in shown.stdout and "sensitivity=0.9" in shown.stdout


def test_bad_operating_point_or_card_file_is_refused_before_training(lake, pneu, tmp_path):
    bad = run_cli("train", "--dataset", "pneu", "--model", "nope", "--operating-point",
                  "sensitivity=95", "--lake", lake, check=False)
    assert bad.returncode == 2 and "target must lie in (0, 1]" in bad.stderr
    label = run_cli("train", "--dataset", "pneu", "--model", "nope", "--operating-point",
                    "Mass:youden", "--lake", lake, check=False)
    assert label.returncode == 2 and "no label 'Mass'" in label.stderr
    (tmp_path / "c.yaml").write_text("intended_use: x\nwarranty: none\n")
    card = run_cli("train", "--dataset", "pneu", "--model", "nope", "--card-file",
                   str(tmp_path / "c.yaml"), "--lake", lake, check=False)
    assert card.returncode == 2 and "--card-file" in card.stderr
