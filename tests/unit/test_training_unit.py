"""The pure training pieces: batch plan, class weights and loss math, the distributed step,
optimizer state round trip, early stopping bookkeeping, the feature-cache key. No Ray."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest

from medray.workers import training as tr
from medray.workers.errors import ConfigError
from medray.workers.models import build_model


# ------------------------------------------------------------------------------ batch plan
@pytest.mark.parametrize("rows,batch,world", [(600, 64, 1), (601, 64, 2), (4708, 64, 3),
                                             (1001, 10, 4)])
def test_plan_gives_every_worker_the_same_whole_batches(rows, batch, world):
    plan = tr.plan_batches(rows, batch, world)
    # Ray's equal split gives each worker floor(rows / world) rows; with drop_last each worker
    # then sees exactly this many full batches, so no worker waits in a collective alone
    per_worker = rows // world
    assert per_worker // plan.local_batch == plan.steps
    assert plan.global_batch == plan.local_batch * world <= batch
    assert plan.steps * plan.global_batch <= rows < (plan.steps + 1) * plan.global_batch + world


def test_plan_refuses_impossible_batches():
    with pytest.raises(ConfigError, match="--batch-size"):
        tr.plan_batches(100, 2, 4)
    with pytest.raises(ConfigError, match="fewer than one global batch"):
        tr.plan_batches(50, 64, 1)
    assert tr.plan_batches(100, 8, 2, local_replicas=2).per_replica == 2


# --------------------------------------------------------------------------- class weights
def test_chexnet_weights_for_multi_label():
    pos, neg = tr.class_weights({"a": 10, "b": 90}, ["a", "b"], 100, multi_label=True)
    np.testing.assert_allclose(pos, [0.9, 0.1], rtol=1e-6)  # |N| / (|P| + |N|)
    np.testing.assert_allclose(neg, [0.1, 0.9], rtol=1e-6)  # |P| / (|P| + |N|)


def test_balanced_weights_for_single_label():
    pos, neg = tr.class_weights({"normal": 25, "pneumonia": 75}, ["normal", "pneumonia"], 100,
                                multi_label=False)
    np.testing.assert_allclose(pos, [2.0, 100 / 150], rtol=1e-6)
    np.testing.assert_allclose(neg, [1.0, 1.0])
    # the weighted class totals are equal: what "balanced" means
    assert 25 * pos[0] == pytest.approx(75 * pos[1])


def test_missing_label_counts_do_not_divide_by_zero():
    pos, _ = tr.class_weights({}, ["a"], 10, multi_label=True)
    assert np.all(np.isfinite(pos))
    with pytest.raises(ConfigError):
        tr.class_weights({"a": 1}, ["a"], 0, multi_label=True)


def test_weighted_bce_matches_numpy():
    y = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    p = np.array([[0.8, 0.3], [0.4, 0.9], [0.6, 0.2]], np.float32)
    pw, nw = np.array([0.9, 0.2], np.float32), np.array([0.1, 0.8], np.float32)
    got = np.asarray(tr.make_loss(True, pw, nw)(y, p))
    expected = -(pw * y * np.log(p) + nw * (1 - y) * np.log(1 - p)).mean(axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_weighted_cross_entropy_matches_numpy_and_unweighted_default():
    y = np.array([[1, 0], [0, 1]], np.float32)
    p = np.array([[0.7, 0.3], [0.1, 0.9]], np.float32)
    w = np.array([2.0, 0.5], np.float32)
    got = np.asarray(tr.make_loss(False, w, None)(y, p))
    np.testing.assert_allclose(got, [-2.0 * math.log(0.7), -0.5 * math.log(0.9)], rtol=1e-5)
    plain = np.asarray(tr.make_loss(False, None, None)(y, p))
    np.testing.assert_allclose(plain, [-math.log(0.7), -math.log(0.9)], rtol=1e-5)


# ------------------------------------------------------------------------- train step, resume
def _data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.integers(0, 60, (n, 28, 28, 1)).astype(np.uint8)
    x[y == 1, 10:18, 10:18] += 150  # a bright square means class 1
    return x, np.eye(2, dtype=np.float32)[y]


def _setup(seed: int = 0, dropout: float = 0.2):
    import keras
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    model = build_model("small_cnn", 28, 1, 2, False, seed=seed, dropout=dropout)
    opt = keras.optimizers.Adam(1e-2)
    opt.build(model.trainable_variables)
    step = tr.make_train_step(strategy, model, opt, tr.make_loss(False, None, None), 16)
    return model, opt, step


def test_train_step_learns_a_separable_problem():
    model, _, step = _setup()
    x, y = _data()
    losses = [float(step(x[:16], y[:16])) for _ in range(15)]
    assert losses[-1] < losses[0] * 0.7
    scores = tr.predict(model, [x])
    assert tr.evaluate(y, scores, ["a", "b"])["mean_auroc"] > 0.9


def _pneumonia(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from tests.support.paths import DATA

    d = np.load(DATA)
    idx = np.random.default_rng(seed).choice(len(d["train_labels"]), n, replace=False)
    return d["train_images"][idx][..., None], np.eye(2, dtype=np.float32)[
        d["train_labels"][idx, 0]]


def test_precise_batchnorm_makes_inference_match_what_was_trained():
    """The training defect of issue 15: after training at the default learning rate the BN
    moving averages lag the weights, so inference-mode features are far from the
    training-mode (batch statistics) ones the network learned with; re-estimating the
    statistics on training images brings them together."""
    import keras
    import tensorflow as tf

    from medray.workers.models import feature_extractor

    x, y = _pneumonia(1024)
    model = build_model("small_cnn", 28, 1, 2, False, seed=0, dropout=0.0)
    opt = keras.optimizers.Adam(2e-3)  # the TrainSpec default
    opt.build(model.trainable_variables)
    step = tr.make_train_step(tf.distribute.get_strategy(), model, opt,
                              tr.make_loss(False, None, None), 64)
    for i in range(0, 1024, 64):
        step(x[i:i + 64], y[i:i + 64])
    feats = feature_extractor(model)
    probe = x[:512].astype(np.float32)

    def gap() -> float:
        trained = np.asarray(feats(probe, training=True))  # batch statistics
        served = np.asarray(feats(probe, training=False))  # moving statistics
        return float(np.abs(trained - served).mean() / np.abs(trained).mean())

    stale = gap()
    assert tr.precise_batchnorm(model, [x[:256], x[256:512]]) == 3  # bn0..bn2 at 28 px
    fresh = gap()
    assert stale > 0.3 and fresh < 0.05, (stale, fresh)
    # momentum is back to what training uses
    assert {b.momentum for b in tr.batchnorm_layers(model)} == {0.99}


def test_precise_batchnorm_leaves_frozen_layers_and_empty_input_alone():
    from medray.workers.models import freeze_backbone

    model = build_model("mobilenet_v2", 32, 1, 2, False, seed=1)
    layers = tr.batchnorm_layers(model)
    assert len(layers) > 30  # the nested backbone's BatchNorms are found
    assert tr.precise_batchnorm(model, []) == 0
    freeze_backbone(model)
    assert tr.batchnorm_layers(model) == []
    before = [w.copy() for w in model.get_weights()]
    x = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 1)).astype(np.uint8)
    assert tr.precise_batchnorm(model, [x]) == 0
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_optimizer_state_round_trip_gives_the_same_next_step(tmp_path):
    # no dropout: its random stream is not part of a checkpoint (see docs/training.md)
    x, y = _data()
    model_a, opt_a, step_a = _setup(dropout=0.0)
    for _ in range(3):
        step_a(x[:16], y[:16])
    model_a.save_weights(tmp_path / "a.weights.h5")
    saved = tr.optimizer_state(opt_a)
    assert int(opt_a.iterations.numpy()) == 3

    model_b, opt_b, step_b = _setup(seed=99, dropout=0.0)  # other init, fresh optimizer
    model_b.load_weights(tmp_path / "a.weights.h5")
    tr.restore_optimizer(opt_b, model_b, saved)
    assert int(opt_b.iterations.numpy()) == 3
    model_c, _, step_c = _setup(seed=98, dropout=0.0)  # same weights, fresh Adam: differs
    model_c.load_weights(tmp_path / "a.weights.h5")
    for step in (step_a, step_b, step_c):
        step(x[16:], y[16:])
    for wa, wb in zip(model_a.get_weights(), model_b.get_weights(), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    conv_a, conv_c = (m.get_layer("conv0").get_weights()[0] for m in (model_a, model_c))
    assert np.abs(conv_a - conv_c).max() > 1e-3


def test_restoring_into_another_model_names_the_fix():
    import keras

    _, opt_a, step_a = _setup()
    x, y = _data()
    step_a(x[:16], y[:16])
    other = build_model("small_cnn", 64, 1, 2, False)  # extra stem layers: more variables
    opt = keras.optimizers.Adam(1e-3)
    with pytest.raises(ConfigError, match="same --arch"):
        tr.restore_optimizer(opt, other, tr.optimizer_state(opt_a))


_TWO_REPLICAS = textwrap.dedent("""
    import numpy as np, tensorflow as tf, keras
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from medray.workers import training as tr
    from medray.workers.models import build_model
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 28, 28, 1)).astype(np.uint8)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 8)]
    out = []
    for devices in (["/cpu:0"], ["/cpu:0", "/cpu:1"]):
        strategy = tf.distribute.MirroredStrategy(devices)
        with strategy.scope():
            model = build_model("small_cnn", 28, 1, 2, False, dropout=0.0, seed=1)
            opt = keras.optimizers.SGD(0.1)
            step = tr.make_train_step(strategy, model, opt, tr.make_loss(False, None, None), 8)
        assert tr.local_replicas(strategy) == len(devices)
        loss = float(step(x, y))
        out.append((loss, model.get_layer("conv0").get_weights()[0]))
    # BatchNorm normalises per replica, so the split changes the numbers slightly, not wildly
    print("LOSS", out[0][0], out[1][0])
    print("DIFF", float(np.abs(out[0][1] - out[1][1]).max()))
""")


def test_a_worker_with_two_devices_splits_its_batch_and_averages_the_loss():
    proc = subprocess.run([sys.executable, "-c", _TWO_REPLICAS], capture_output=True,
                          text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines()
                 if line.startswith(("LOSS", "DIFF")))
    one, two = map(float, lines["LOSS"].split())
    assert one == pytest.approx(two, rel=0.05)  # a global mean, not a sum over replicas
    assert float(lines["DIFF"]) < 0.05


# ------------------------------------------------------------------------ epochs, stopping
def _rec(epoch: int, auc: float) -> dict:
    return {"epoch": epoch, "val_mean_auroc": auc, "loss": 0.1}


def test_best_epoch_and_early_stop_on_mean_auroc():
    state = tr.new_state()
    seen = [tr.end_epoch(state, _rec(e, a), patience=2, max_epochs=10)
            for e, a in enumerate([0.7, 0.8, 0.79, 0.81, 0.80, 0.80], start=1)]
    assert seen == [(True, False), (True, False), (False, False), (True, False),
                    (False, False), (False, True)]
    assert state["best_epoch"] == 4 and state["best_auroc"] == 0.81
    assert tr.finished(state, 10) and "2 epochs" in state["stopped"]


def test_reaching_max_epochs_is_not_an_early_stop():
    state = tr.new_state()
    tr.end_epoch(state, _rec(1, 0.9), patience=1, max_epochs=2)
    improved, stop = tr.end_epoch(state, _rec(2, 0.5), patience=1, max_epochs=2)
    assert (improved, stop) == (False, False)
    assert tr.finished(state, 2) and state["stopped"] is None


def test_without_any_finite_auroc_the_last_epoch_is_kept():
    state = tr.new_state()
    assert tr.end_epoch(state, _rec(1, float("nan")), 5, 2) == (False, False)
    assert tr.end_epoch(state, _rec(2, float("nan")), 5, 2) == (True, False)
    assert state["best_epoch"] == 2


def test_thresholds_from_validation_and_one_class_fallback():
    from medray.workers.operating_points import choose, parse, primary_thresholds

    y = np.array([[1, 0], [1, 0], [0, 0], [0, 0]], np.float32)
    s = np.array([[0.9, 0.1], [0.6, 0.2], [0.4, 0.3], [0.1, 0.4]], np.float32)
    th = primary_thresholds(choose(y, s, ["a", "b"], parse("youden"), "val"))
    assert th == pytest.approx({"a": 0.5, "b": 0.5})  # midway between 0.6 and 0.4; fallback


# ---------------------------------------------------------------------------- cache key, logs
def test_feature_key_covers_what_changes_the_features():
    key, covers = tr.feature_key("mobilenet_v2", 32, 1, "none", 0, "3.15.1")
    assert key.startswith("mobilenet_v2-") and len(key.split("-")[1]) == 12
    assert tr.feature_key("mobilenet_v2", 32, 1, "none", 0, "3.15.1")[0] == key
    others = [tr.feature_key("mobilenet_v2", 32, 1, "none", 1, "3.15.1")[0],
              tr.feature_key("mobilenet_v2", 64, 1, "none", 0, "3.15.1")[0],
              tr.feature_key("mobilenet_v2", 32, 3, "none", 0, "3.15.1")[0],
              tr.feature_key("mobilenet_v2", 32, 1, "file:ab", 0, "3.15.1")[0],
              tr.feature_key("densenet121", 32, 1, "none", 0, "3.15.1")[0]]
    assert len({key, *others}) == 6
    # the seed only matters for random weights
    assert (tr.feature_key("mobilenet_v2", 32, 1, "imagenet", 0, "3.15.1")[0]
            == tr.feature_key("mobilenet_v2", 32, 1, "imagenet", 5, "3.15.1")[0])
    assert covers["weights"] == "none" and covers["seed"] == 0


def test_progress_lines_read_well_with_missing_metrics():
    line = tr.epoch_line({"epoch": 3, "loss": 0.25, "val_loss": float("nan"),
                          "val_mean_auroc": None, "val_auroc": {"a": 0.9},
                          "images_per_s": 812.4, "seconds": 5.0}, 12)
    assert line.startswith("epoch 3/12 done: loss 0.2500")
    assert "val mean AUROC n/a" in line and "a 0.9000" in line and "812 images/s" in line
    assert tr.progress_line(1, 2, 5, 10, 99.6, 0.5) == (
        "epoch 1/2 step 5/10: loss 0.5000, 100 images/s")


# ------------------------------------------------- the job's bookkeeping on a local lake, no Ray
def _shard(lake, rel: str, rows: list[tuple[str, list[str] | None]]) -> None:
    from medray.workers.shards import shard_table

    lake.write_parquet(rel, shard_table([
        {"image_id": f"id{i}", "source_uri": f"s{i}", "labels": labels, "split": split,
         "height": 2, "width": 2, "channels": 1, "pixels": bytes([i] * 4)}
        for i, (split, labels) in enumerate(rows)]))


def test_readers_keep_one_split_with_known_labels(tmp_path):
    from medray.cluster.store.lake import Lake
    from medray.cluster.train.data import RowCounts, count_rows, read_images

    lake = Lake(str(tmp_path / "lake"))
    rows = [("train", ["a"]), ("train", ["b"]), ("val", ["a"]), ("train", None),
            ("train", ["a", "b"]), ("test", [])]
    _shard(lake, "datasets/d/1/shards/part-00000.parquet", rows)
    out = list(read_images({"path": ["datasets/d/1/shards/part-00000.parquet"]}, lake.uri,
                           "train", ["a", "b"], True))
    x = np.concatenate([b["x"] for b in out])
    y = np.concatenate([b["y"] for b in out])
    assert x.shape == (3, 2, 2, 1)  # the unlabelled train row is never trained on
    got = {int(img[0, 0, 0]): tuple(t) for img, t in zip(x, y, strict=True)}
    assert got == {0: (1.0, 0.0), 1: (0.0, 1.0), 4: (1.0, 1.0)}
    counts = count_rows(lake, {"shards": [{"path": "datasets/d/1/shards/part-00000.parquet"}]},
                        ["a", "b"])
    assert counts == RowCounts({"train": 3, "val": 1, "test": 1}, {"a": 2, "b": 2},
                               {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 0},
                                "test": {"a": 0, "b": 0}})
    keyed = list(read_images({"path": ["datasets/d/1/shards/part-00000.parquet"]}, lake.uri,
                             "val", ["a", "b"], True, keys=True))
    assert keyed[0]["g"].tolist() == ["image:id2"]  # no patient key: the image is its unit
    assert (counts.train, counts.val_split) == (3, "val")
    assert RowCounts({"train": 3, "test": 1}, {}).val_split == "test"


def test_validation_rows_are_read_by_a_thread_file_by_file(tmp_path):
    from medray.cluster.store.lake import Lake
    from medray.cluster.train.data import SplitRows, read_images, reader_for
    from medray.workers.errors import NotFoundError

    lake = Lake(str(tmp_path / "lake"))
    rows = [("val", ["a"]), ("train", ["b"]), ("val", ["b"]), ("val", None), ("val", [])]
    _shard(lake, "s/part-00000.parquet", rows)
    _shard(lake, "s/part-00001.parquet", [("train", ["a"])])
    # the thread reads every file; a file without rows of the split gives no batch
    paths = ["s/part-00001.parquet", "s/part-00000.parquet"]
    batches = SplitRows(paths, reader_for(False), lake.uri, "val", ["a", "b"], True).batches()
    assert len(batches) == 1
    # the split's labelled rows: pixels, targets, bootstrap units (in a fresh random order
    # each read: data.labelled)
    (batch,) = batches
    assert batch["x"].shape == (3, 2, 2, 1) and batch["y"].shape == (3, 2)
    got = {int(img[0, 0, 0]): (tuple(t), g) for img, t, g in zip(batch["x"], batch["y"],
                                                                 batch["g"], strict=True)}
    assert got == {0: ((1.0, 0.0), "image:id0"), 2: ((0.0, 1.0), "image:id2"),
                   4: ((0.0, 0.0), "image:id4")}
    # what the reading raised is raised by batches(), in the caller's thread
    missing = SplitRows([*paths, "s/part-00009.parquet"], read_images, lake.uri, "val",
                        ["a", "b"], True)
    with pytest.raises(NotFoundError, match="part-00009.parquet"):
        missing.batches()


def test_the_end_of_training_takes_the_best_weights_from_memory_or_the_checkpoint(
        monkeypatch):
    from medray.cluster.train import checkpoints, remote

    class Model:
        weights: object = "last epoch's"

        def set_weights(self, weights):
            self.weights = weights

    read = []
    monkeypatch.setattr(checkpoints, "load_best",
                        lambda lake, plan, model: (read.append(1),
                                                   model.set_weights("best checkpoint's")))
    model = Model()
    # early stop: epoch 3 was this job's best, epoch 5 its last
    assert remote.restore_best(None, None, model, {"best_epoch": 3}, (3, "epoch 3's")) == "memory"
    assert model.weights == "epoch 3's" and not read
    # resumed: the best epoch (2) came from an earlier job; weights kept for any other epoch
    # are never taken for it
    for kept in (None, (4, "epoch 4's")):
        model = Model()
        assert remote.restore_best(None, None, model, {"best_epoch": 2}, kept) == "checkpoint"
        assert model.weights == "best checkpoint's"
    assert len(read) == 2


def test_training_ids_resume_and_refusals(tmp_path):
    from medray.cluster.store.lake import Lake
    from medray.cluster.train.checkpoints import choose_training
    from medray.workers.specs import TrainSpec

    lake = Lake(str(tmp_path / "lake"))
    spec = TrainSpec(dataset="d", model="m")
    resume = spec.model_copy(update={"resume": True})
    with pytest.raises(ConfigError, match="--run-id"):
        choose_training(lake, resume, "job0")
    fresh, started = choose_training(lake, spec, "job1")
    assert fresh.startswith("m-") and not started
    assert choose_training(lake, resume, "job2") == (fresh, False)
    lake.write_json(f"models/m/_training/{fresh}/checkpoints/latest.json", {"epoch": 1})
    assert choose_training(lake, resume, "job3") == (fresh, True)
    assert lake.read_json("models/m/_training/latest.json")["job_id"] == "job3"
    named = spec.model_copy(update={"run_id": fresh})
    with pytest.raises(ConfigError, match="add --resume"):
        choose_training(lake, named, "job4")
    assert choose_training(lake, resume.model_copy(update={"run_id": fresh}), "job5") == (
        fresh, True)
    assert choose_training(lake, spec.model_copy(update={"run_id": "new-id"}), "job6") == (
        "new-id", False)


def test_resume_must_be_the_same_model_but_may_change_schedules():
    from medray.cluster.train.checkpoints import check_resume

    saved = {"arch": "small_cnn", "mode": "full", "weights": "none", "augment": False,
             "dataset_version": 1, "labels": ["a"], "epochs": 12, "learning_rate": 0.002}
    assert check_resume(saved, {**saved, "epochs": 20}, "t") == ["epochs"]
    with pytest.raises(ConfigError, match="arch"):
        check_resume(saved, {**saved, "arch": "densenet121"}, "t")
    with pytest.raises(ConfigError, match="dataset_version"):
        check_resume(saved, {**saved, "dataset_version": 2}, "t")
    # a record from before --augment-recipe existed trained with the light preset
    with_recipe = {**saved, "augment": True, "augment_recipe": "light"}
    assert check_resume({**saved, "augment": True}, with_recipe, "t") == []
    with pytest.raises(ConfigError, match="augment_recipe: 'light' -> 'strong'"):
        check_resume({**saved, "augment": True}, {**with_recipe, "augment_recipe": "strong"}, "t")


def test_weights_references_resolve_or_say_what_to_pass(tmp_path):
    import hashlib

    from medray.cluster.store.lake import Lake
    from medray.cluster.train.precheck import check
    from medray.cluster.train.weights import resolve_weights
    from medray.workers.errors import NotFoundError
    from medray.workers.specs import TrainSpec

    lake = Lake(str(tmp_path / "lake"))
    local = tmp_path / "w.keras"
    local.write_bytes(b"pretend model")
    init = resolve_weights(lake, str(local), "m", "t")
    assert init.kind == "file" and init.path == "models/m/_training/t/init/w.keras"
    assert init.identity == "file:" + hashlib.sha256(b"pretend model").hexdigest()
    assert lake.read_bytes(init.path) == b"pretend model"
    local.unlink()  # a resumed training still finds the copy it uploaded
    assert resolve_weights(lake, str(local), "m", "t") == init
    lake.write_bytes("shared/w.weights.h5", b"w")
    assert resolve_weights(lake, "shared/w.weights.h5", "m", None).path == (
        "shared/w.weights.h5")
    with pytest.raises(NotFoundError, match="no such file"):
        resolve_weights(lake, "missing/w.keras", "m", None)
    with pytest.raises(NotFoundError, match="no model 'other'"):
        resolve_weights(lake, "other:3", "m", None)
    assert resolve_weights(lake, "none", "m", None).identity == "none"

    lake.write_json("datasets/d/1/manifest.json", {"image_size": 28, "labels": ["a"]})
    with pytest.raises(ConfigError, match="small_cnn has no pretrained"):
        check(TrainSpec(dataset="d", model="m", arch="small_cnn", weights="imagenet"), lake)
    with pytest.raises(ConfigError, match="at least 32px"):
        check(TrainSpec(dataset="d", model="m", arch="densenet121"), lake)
    lake.write_json("models/m/_training/t/checkpoints/latest.json", {"epoch": 1})
    with pytest.raises(ConfigError, match="add --resume"):
        check(TrainSpec(dataset="d", model="m", run_id="t"), lake)
    check(TrainSpec(dataset="d", model="m", run_id="t", resume=True), lake)


def test_feature_files_follow_their_shard():
    from medray.cluster.store.layout import feature_file, feature_marker

    path = feature_file("mobilenet_v2-abc", "datasets/cxr/2/shards/part-00003.parquet")
    assert path == "features/mobilenet_v2-abc/cxr/2/part-00003.parquet"
    assert feature_marker(path) == "features/mobilenet_v2-abc/cxr/2/part-00003.json"


def test_a_workers_bad_input_surfaces_from_ray_train_wrappers():
    from ray.train.v2.api.exceptions import WorkerGroupError

    from medray.cluster.train.job import _unwrap
    from medray.workers.errors import InputError

    bad = InputError("--weights x.keras: no layer matches")
    wrapped = WorkerGroupError("Training failed", {0: RuntimeError("other"), 1: bad})
    assert _unwrap(wrapped) is bad
    plain = RuntimeError("boom")
    assert _unwrap(plain) is plain


def test_the_plan_travels_whole_to_the_workers():
    import cloudpickle

    from medray.cluster.train.plan import PLAN, DatasetFacts, TrainPlan
    from medray.cluster.train.weights import InitWeights, ModelShape
    from medray.workers.models import PRESETS
    from medray.workers.specs import TrainSpec

    spec = TrainSpec(dataset="d:2", model="m", arch="mobilenet_v2", mode="head", seed=7)
    facts = DatasetFacts.from_manifest("d", 2, {"labels": ["a", "b"], "multi_label": True,
                                                 "image_size": 32, "channels": 1})
    plan = TrainPlan(spec=spec, lake_uri="/lake", job_id="j1", train_id="t1", data=facts,
                     train_rows=100, val_split="val", init=InitWeights("none", "none"),
                     class_weights=((0.9, 0.8), (0.1, 0.2)), feature_dim=1280)
    # Ray Train pickles train_loop_config to every worker: the plan comes back equal and frozen
    back = cloudpickle.loads(cloudpickle.dumps({PLAN: plan}))[PLAN]
    assert back == plan and back.spec == spec
    assert back.run_dir == "models/m/_training/t1" and back.cached and back.augment is None
    assert back.shape == ModelShape("mobilenet_v2", 32, 1, 2, True, 7)
    with pytest.raises(AttributeError):
        back.train_id = "other"
    # the recipe is what the workers build their augmentation layers from
    strong = replace(plan, spec=spec.model_copy(update={"augment": True,
                                                        "augment_recipe": "strong"}))
    assert strong.augment == PRESETS["strong"]
    # the calibration form the workers fit is the one the job resolved for the images
    with pytest.raises(RuntimeError, match="resolved for the images"):
        _ = plan.calibration_form
    assert replace(plan, spec=spec.for_images(32)).calibration_form == "temperature"
    assert replace(strong, spec=strong.spec.for_images(32)).calibration_form == \
        "temperature+balanced-bias"
    # spec.json: every spec field, the dataset reference resolved, and the dataset's facts
    described = facts.describe(spec)
    assert described == {**spec.model_dump(), "dataset": "d", "dataset_version": 2,
                         "labels": ["a", "b"], "multi_label": True, "image_size": 32,
                         "channels": 1}


def test_card_file_gives_the_cards_text_or_names_the_fix(tmp_path):
    from medray.cluster.train.precheck import card_file
    from medray.workers.errors import InputError
    from medray.workers.specs import TrainSpec

    good = tmp_path / "card.yaml"
    good.write_text("intended_use: Second reader in a study.\nout_of_scope: [Adults, Triage]\n"
                    "users: researchers\nlimitations: One hospital.\n")
    spec = TrainSpec(dataset="d", model="m", card_file=str(good))
    assert card_file(spec) == {"primary": "Second reader in a study.",
                               "out_of_scope": ["Adults", "Triage"], "users": "researchers",
                               "limitations": ["One hospital."]}
    assert card_file(TrainSpec(dataset="d", model="m")) == {}
    for text, why in (("warranty: none\n", "keys from"), ("- a\n- b\n", "keys from"),
                      ("limitations: [1, 2]\n", "text or a list"), ("a: [\n", "not YAML")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(InputError, match=why):
            card_file(TrainSpec(dataset="d", model="m", card_file=str(bad)))
    with pytest.raises(InputError, match="not found"):
        card_file(TrainSpec(dataset="d", model="m", card_file=str(tmp_path / "none.yaml")))
