"""What the calibration is fitted on must be what the scorer sees: BatchNorm statistics that
training re-estimates before validation come from unaugmented images (augmentation layers run
in training mode too), and per-image standardisation is a layer of the model, so training and
scoring compute it alike. No Ray."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from medray.workers import training as tr
from medray.workers.models import Augment, build_model, transfer_weights


def _batch(seed: int = 0, n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28, 1)).astype(np.uint8)


def _bn0_input_moments(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and variance of what bn0 sees for ``x``, through ``model``'s layers."""
    conv = keras.Model(model.input, model.get_layer("conv0").output)
    out = np.asarray(conv(x.astype(np.float32), training=False), np.float64)
    return out.mean(axis=(0, 1, 2)), out.var(axis=(0, 1, 2))


def test_precise_batchnorm_takes_its_statistics_from_unaugmented_images():
    """A strong brightness augmentation: bn0's statistics must be those of the plain images
    (what inference sees), not of brightened ones."""
    aug = Augment(flip=False, crop=0.0, rotation=0.0, brightness=0.5)
    model = build_model("small_cnn", 28, 1, 2, False, seed=1, augment=aug)
    plain = build_model("small_cnn", 28, 1, 2, False, seed=1)
    transfer_weights(model, plain)
    x = _batch()
    assert tr.precise_batchnorm(model, [x]) == 3
    mean, var = _bn0_input_moments(plain, x)
    bn = model.get_layer("bn0")
    np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-2, atol=1e-5)
    # and the augmented forward pass would have given other statistics: the check can fail
    aug_only = keras.Model(model.input, model.get_layer("aug_brightness").output)
    brightened = np.asarray(aug_only(x.astype(np.float32), training=True))
    other, _ = _bn0_input_moments(plain, brightened)
    assert np.abs(other - mean).max() > 10 * np.abs(bn.moving_mean.numpy() - mean).max()


def test_unaugmented_is_the_model_itself_without_augmentation_layers():
    model = build_model("small_cnn", 28, 1, 2, False)
    assert tr.unaugmented(model) is model
    with_aug = build_model("small_cnn", 28, 1, 2, False, augment=Augment())
    sub = tr.unaugmented(with_aug)
    assert not any(layer.name.startswith("aug_") for layer in sub.layers)
    x = _batch(2, 8).astype(np.float32)
    np.testing.assert_allclose(sub(x, training=False), with_aug(x, training=False), atol=1e-6)


@pytest.mark.parametrize("scale,shift", [(1.5, -20.0), (0.5, 40.0)])
def test_standardisation_is_in_the_model_and_ignores_brightness_and_contrast(scale, shift):
    """The standardised small_cnn scores an image and the same image with its contrast and
    brightness changed alike (the layer sees only the image's own mean and spread), and the
    saved model computes it too."""
    model = build_model("small_cnn", 28, 1, 2, False, seed=3, standardize=True)
    x = _batch(3, 4).astype(np.float32) * 0.6 + 30
    changed = x * scale + shift
    np.testing.assert_allclose(model(changed, training=False), model(x, training=False),
                               atol=1e-4)
    plain = build_model("small_cnn", 28, 1, 2, False, seed=3)
    # the 1/255 scaling does see the change: the check can fail
    assert np.abs(plain(changed, training=False) - plain(x, training=False)).max() > 1e-3


def test_a_saved_standardised_model_scores_the_same(tmp_path):
    model = build_model("small_cnn", 28, 1, 2, False, seed=4, standardize=True)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    x = _batch(4, 5).astype(np.float32)
    np.testing.assert_allclose(loaded(x, training=False), model(x, training=False), atol=1e-6)
