"""The pure Scorer on a real (tiny, untrained) Keras model: no Ray, no lake."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from medray.workers.models import build_model, load_model
from medray.workers.scorer import Scorer, apply_mixed_precision, decode_batch, prediction_schema
from medray.workers.shards import shard_table

SIZE = 16
LABELS = ["effusion", "mass", "nodule"]


def _rows(n: int, seed: int = 0, size: int = SIZE) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"image_id": f"img-{seed}-{i:03d}", "source_uri": f"/src/{i}.png",
             "labels": ["mass"] if i % 2 else [], "patient_key": f"p{i}", "split": "test",
             "height": size, "width": size, "channels": 1,
             "pixels": rng.integers(0, 256, (size, size, 1), dtype=np.uint8).tobytes()}
            for i in range(n)]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    build_model("small_cnn", SIZE, 1, len(LABELS), multi_label=True, seed=3).save(path)
    return path


def _card(**extra) -> dict:
    return {"name": "tiny", "labels": LABELS, "multi_label": True, "input_size": SIZE,
            "channels": 1, "arch": "small_cnn", "version": 1, **extra}


@pytest.fixture(scope="module")
def scorer(model_file) -> Scorer:
    return Scorer(str(model_file), _card(), predict_batch=8)


def _reference(model_file: Path, rows: list[dict]) -> np.ndarray:
    """Scores straight from Keras, the way a user would call the model."""
    model = load_model(str(model_file))
    x = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(SIZE, SIZE, 1) for r in rows])
    return np.asarray(model.predict(x.astype(np.float32), verbose=0))


def test_every_input_row_gets_one_output_row_with_keras_scores(scorer, model_file):
    rows = _rows(21)  # not a multiple of predict_batch: the last chunk is partial
    out = scorer(shard_table(rows))
    assert out.num_rows == 21
    assert out.column("image_id").to_pylist() == [r["image_id"] for r in rows]
    assert out.column("true_labels").to_pylist() == [r["labels"] for r in rows]
    assert out.column("error").null_count == 21
    got = np.stack([out.column(f"score_{lab}").to_numpy() for lab in LABELS], axis=1)
    np.testing.assert_allclose(got, _reference(model_file, rows), atol=1e-5)
    assert out.schema.equals(prediction_schema(LABELS))


def test_bad_pixel_buffer_gets_an_error_and_null_scores_others_scored(scorer, model_file):
    rows = _rows(6, seed=1)
    rows[2]["pixels"] = rows[2]["pixels"][:-5]  # truncated buffer
    rows[4]["height"] = rows[4]["width"] = 8  # a size the model does not take
    rows[4]["pixels"] = bytes(64)
    out = scorer(shard_table(rows))
    errors = out.column("error").to_pylist()
    assert errors[2].startswith("bad_pixels:") and f"{SIZE * SIZE - 5} bytes" in errors[2]
    assert errors[4].startswith("shape_mismatch:") and "8x8x1" in errors[4]
    good = [0, 1, 3, 5]
    assert all(errors[i] is None for i in good)
    for lab in LABELS:
        col = out.column(f"score_{lab}")
        assert col[2].as_py() is None and col[4].as_py() is None
    assert out.column("predicted_labels")[2].as_py() is None
    got = np.stack([out.column(f"score_{lab}").to_numpy(zero_copy_only=False)[good]
                    for lab in LABELS], axis=1)
    np.testing.assert_allclose(got, _reference(model_file, [rows[i] for i in good]), atol=1e-5)


def test_multi_label_thresholds_from_the_card_drive_predicted_labels(model_file):
    rows = _rows(12, seed=2)
    plain = Scorer(str(model_file), _card(), predict_batch=64)(shard_table(rows))
    scores = np.stack([plain.column(f"score_{lab}").to_numpy() for lab in LABELS], axis=1)
    # thresholds at the per-label median: about half the rows over each, whatever the weights
    thresholds = {lab: float(np.median(scores[:, j])) for j, lab in enumerate(LABELS)}
    out = Scorer(str(model_file), _card(thresholds=thresholds))(shard_table(rows))
    expected = [[lab for j, lab in enumerate(LABELS) if scores[i, j] >= thresholds[lab]]
                for i in range(len(rows))]
    assert out.column("predicted_labels").to_pylist() == expected
    # the default 0.5 gives another answer on at least one row, so the card did matter
    default = [[lab for j, lab in enumerate(LABELS) if scores[i, j] >= 0.5]
               for i in range(len(rows))]
    assert default != expected
    assert plain.column("predicted_labels").to_pylist() == default


def test_single_label_predicts_the_top_score(tmp_path):
    path = tmp_path / "single.keras"
    build_model("small_cnn", SIZE, 1, 2, multi_label=False, seed=1).save(path)
    card = {**_card(), "labels": ["normal", "pneumonia"], "multi_label": False}
    out = Scorer(str(path), card)(shard_table(_rows(9, seed=4)))
    s = np.stack([out.column("score_normal").to_numpy(), out.column("score_pneumonia").to_numpy()],
                 axis=1)
    np.testing.assert_allclose(s.sum(axis=1), 1.0, atol=1e-5)  # softmax
    top = [["normal", "pneumonia"][int(i)] for i in np.argmax(s, axis=1)]
    assert out.column("predicted_labels").to_pylist() == [[t] for t in top]


def test_bookkeeping_columns_pass_through(scorer):
    table = shard_table(_rows(5, seed=5))
    table = table.append_column("_shard", pa.array(["a", "a", "b", "b", "b"]))
    out = scorer(table)
    assert out.column("_shard").to_pylist() == ["a", "a", "b", "b", "b"]


def test_decode_is_zero_copy_for_a_clean_batch_and_copies_on_a_sliced_one():
    rows = _rows(10, seed=6)
    table = shard_table(rows)
    x, errors = decode_batch(table, (SIZE, SIZE, 1))
    assert errors == [None] * 10 and not x.flags.owndata
    part = table.slice(3, 4)
    y, _ = decode_batch(part, (SIZE, SIZE, 1))
    expected = np.stack([np.frombuffer(r["pixels"], np.uint8) for r in rows[3:7]])
    np.testing.assert_array_equal(y.reshape(4, -1), expected)
    empty, errs = decode_batch(table.slice(0, 0), (SIZE, SIZE, 1))
    assert empty.shape == (0, SIZE, SIZE, 1) and errs == []


def test_mixed_precision_copy_computes_in_float16_with_float32_scores(model_file):
    model = load_model(str(model_file))
    mixed = apply_mixed_precision(model)
    policies = {layer.name: layer.dtype_policy.name for layer in mixed.layers}
    assert policies["conv0"] == "mixed_float16"
    assert policies["scores"] == "float32"
    x = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(SIZE, SIZE, 1)
                  for r in _rows(4, seed=7)]).astype(np.float32)
    full = np.asarray(model(x, training=False))
    half = np.asarray(mixed(x, training=False))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=2e-2)  # float16 rounding, same model


def test_mixed_precision_without_a_gpu_scores_in_float32(model_file):
    s = Scorer(str(model_file), _card(), mixed_precision=True)
    assert s.precision == "float32" and not s.gpus


def test_a_calibrated_card_scores_calibrated_and_keeps_the_raw_score(model_file):
    """The card's temperatures (one per sigmoid label) turn the model's scores into calibrated
    ones in score_<label>; raw_score_<label> is the model's own output; the thresholds apply
    to the calibrated scores."""
    from medray.workers.calibration import apply

    temps = {"effusion": 0.5, "mass": 1.0, "nodule": 4.0}
    card = _card(calibration={"method": "temperature", "fitted_on": "val",
                              "temperature": temps},
                 thresholds={"effusion": 0.5, "mass": 0.5, "nodule": 0.5})
    scorer = Scorer(str(model_file), card, predict_batch=8)
    rows = _rows(9, seed=4)
    rows[3]["pixels"] = b"short"
    out = scorer(shard_table(rows))
    raw = np.stack([out.column(f"raw_score_{lab}").to_numpy(zero_copy_only=False)
                    for lab in LABELS], axis=1)
    cal = np.stack([out.column(f"score_{lab}").to_numpy(zero_copy_only=False)
                    for lab in LABELS], axis=1)
    ok = [i for i in range(9) if i != 3]
    np.testing.assert_allclose(raw[ok], _reference(model_file, [rows[i] for i in ok]),
                               atol=1e-5)
    np.testing.assert_allclose(cal[ok], apply(raw[ok], list(temps.values()), True), atol=1e-6)
    assert not np.allclose(cal[ok][:, 2], raw[ok][:, 2])  # T = 4 pulls scores to 0.5
    assert np.isnan(raw[3]).all() and np.isnan(cal[3]).all()
    predicted = out.column("predicted_labels").to_pylist()
    for i in ok:
        assert predicted[i] == [lab for j, lab in enumerate(LABELS) if cal[i, j] >= 0.5]
    # the prediction schema comes first, the raw scores after it
    assert out.schema.names[:len(prediction_schema(LABELS))] == prediction_schema(LABELS).names


def test_an_uncalibrated_card_adds_no_raw_columns(scorer):
    out = scorer(shard_table(_rows(3)))
    assert not [c for c in out.column_names if c.startswith("raw_score_")]


def test_a_card_with_biases_scores_with_temperature_and_bias(model_file):
    """A card whose calibration kept a bias per label: score_<label> is
    sigmoid(logit / T + b) of the raw score, not the temperature alone."""
    from medray.workers.calibration import apply

    temps = {"effusion": 0.5, "mass": 1.0, "nodule": 2.0}
    bias = {"effusion": 0.0, "mass": -1.5, "nodule": 0.7}
    card = _card(calibration={"method": "temperature", "fitted_on": "val",
                              "temperature": temps, "bias": bias,
                              "form": {"effusion": "temperature", "mass": "temperature+bias",
                                       "nodule": "temperature+bias"}},
                 thresholds={"effusion": 0.5, "mass": 0.5, "nodule": 0.5})
    out = Scorer(str(model_file), card, predict_batch=8)(shard_table(_rows(7, seed=5)))
    raw = np.stack([out.column(f"raw_score_{lab}").to_numpy() for lab in LABELS], axis=1)
    cal = np.stack([out.column(f"score_{lab}").to_numpy() for lab in LABELS], axis=1)
    np.testing.assert_allclose(cal, apply(raw, list(temps.values()), True, list(bias.values())),
                               atol=1e-6)
    no_bias = apply(raw, list(temps.values()), True)
    np.testing.assert_allclose(cal[:, 0], no_bias[:, 0], atol=1e-6)  # bias 0: T alone
    assert np.abs(cal[:, 1] - no_bias[:, 1]).min() > 1e-3  # the bias moves every score
