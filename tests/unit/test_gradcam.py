"""Grad-CAM on models built by workers/models.py (a small_cnn whose weights are set by hand to
detect bright spots, so the right answer is known; a nested ImageNet backbone) and on models
users bring: a Sequential saved to .keras, a functional model ending in an activation layer."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medray.workers.errors import InputError

pytest.importorskip("tensorflow")

SIZE = 28


@pytest.fixture(scope="module")
def keras():
    import keras

    return keras


@pytest.fixture(scope="module")
def bright_spot_cnn(keras):
    """small_cnn wired so that output 0's logit grows with brightness anywhere in the image and
    output 1's logit shrinks with it: conv kernels pass channel 0 through their centre tap, the
    batch norms are at their identity initialisation, the head reads feature 0."""
    from medray.workers.models import build_model

    model = build_model("small_cnn", SIZE, 1, 2, multi_label=True)
    for name in ("conv0", "conv1", "conv2"):
        layer = model.get_layer(name)
        kernel = np.zeros(layer.kernel.shape, dtype=np.float32)
        kernel[1, 1, 0, 0] = 1.0
        layer.kernel.assign(kernel)
    head = model.get_layer("scores")
    kernel = np.zeros(head.kernel.shape, dtype=np.float32)
    kernel[0, 0], kernel[0, 1] = 20.0, -20.0
    head.kernel.assign(kernel)
    head.bias.assign(np.array([-2.0, 2.0], dtype=np.float32))
    return model


def _spot_image(rng: np.random.Generator, row: int, col: int) -> np.ndarray:
    img = rng.integers(0, 40, size=(SIZE, SIZE, 1)).astype(np.uint8)
    img[row - 3:row + 3, col - 3:col + 3] = 240
    return img


def test_heatmap_peaks_on_the_bright_spot(bright_spot_cnn) -> None:
    from medray.workers.gradcam import GradCam

    rng = np.random.default_rng(0)
    spots = [(6, 6), (6, 21), (21, 8), (20, 20), (14, 14)]
    x = np.stack([_spot_image(rng, r, c) for r, c in spots])
    cam = GradCam(bright_spot_cnn)
    # the last conv map with >= 2x2 cells: 7x7 after two poolings, the third pooling skipped
    target = bright_spot_cnn.get_layer(cam.layer_name)
    assert tuple(target.output.shape[1:]) == (7, 7, 128)
    assert "Pooling" not in type(target).__name__
    maps = cam.heatmaps(x, 0)
    assert maps.shape == (len(spots), SIZE, SIZE)
    assert maps.min() >= 0.0 and maps.max() == pytest.approx(1.0)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    for m, (r, c) in zip(maps, spots, strict=True):
        # max pooling spreads the spot over a plateau of 4-pixel cells: its centre is the spot
        hot = m > 0.9
        centre = rows[hot].mean(), cols[hot].mean()
        assert abs(centre[0] - r) <= 3 and abs(centre[1] - c) <= 3, (centre, (r, c))
        assert hot.mean() < 0.25  # a localised plateau, not the whole image
        inside = m[r - 3:r + 3, c - 3:c + 3].mean()
        outside = np.delete(m.reshape(-1), np.ravel_multi_index(
            np.mgrid[r - 3:r + 3, c - 3:c + 3].reshape(2, -1), m.shape)).mean()
        assert inside > 3 * outside


def test_label_index_selects_the_class(bright_spot_cnn) -> None:
    """Output 1 falls with brightness: nothing raises its logit, so its map is empty, while a
    per-image index mixes both answers in one batch."""
    from medray.workers.gradcam import GradCam

    rng = np.random.default_rng(1)
    x = np.stack([_spot_image(rng, 8, 8), _spot_image(rng, 20, 20)])
    cam = GradCam(bright_spot_cnn)
    assert np.all(cam.heatmaps(x, 1) == 0.0)
    mixed = cam.heatmaps(x, np.array([0, 1]))
    assert mixed[0].max() == pytest.approx(1.0) and np.all(mixed[1] == 0.0)
    with pytest.raises(InputError, match="out of range"):
        cam.heatmaps(x, 2)


def test_logits_are_what_the_model_squashes(bright_spot_cnn) -> None:
    from medray.workers.gradcam import GradCam

    rng = np.random.default_rng(2)
    x = rng.integers(0, 255, size=(4, SIZE, SIZE, 1)).astype(np.uint8)
    logits = GradCam(bright_spot_cnn).logits(x)
    out = np.asarray(bright_spot_cnn(x.astype(np.float32), training=False))
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), out, atol=1e-5)


def test_nested_backbone_is_split_at_its_last_feature_map(keras) -> None:
    """MobileNetV2 inside the model (grey -> RGB -> scale -> backbone -> dropout -> Dense): the
    split reproduces the model's softmax, and the 1x1 final map is passed over for a 2x2 one."""
    from medray.workers.gradcam import GradCam
    from medray.workers.models import build_model

    model = build_model("mobilenet_v2", 32, 1, 3, multi_label=False, seed=3)
    cam = GradCam(model)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, size=(2, 32, 32, 1)).astype(np.uint8)
    logits = cam.logits(x)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out = np.asarray(model(x.astype(np.float32), training=False))
    np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True), out, atol=1e-5)
    from medray.workers.models import backbone_of

    target = backbone_of(model).get_layer(cam.layer_name)
    assert target.output.shape[1] == target.output.shape[2] == 2
    assert type(target).__name__ not in ("ZeroPadding2D", "MaxPooling2D")
    maps = cam.heatmaps(x, [0, 2])
    assert maps.shape == (2, 32, 32) and np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_model_without_feature_map_is_refused(keras) -> None:
    from medray.workers.gradcam import GradCam

    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="sigmoid")(x))
    with pytest.raises(InputError, match="no convolutional feature map"):
        GradCam(model)
    softmax_end = keras.Model(inputs, keras.layers.Activation("softmax")(x))
    with pytest.raises(InputError, match="ending in a Dense layer"):
        GradCam(softmax_end)


def test_overlay_png_is_the_image_tinted_where_hot(bright_spot_cnn) -> None:
    from medray.workers.gradcam import GradCam, colormap, overlay, overlay_pngs

    rng = np.random.default_rng(4)
    img = _spot_image(rng, 7, 20)
    (png,) = overlay_pngs(GradCam(bright_spot_cnn), img[None], 0, size=112)
    decoded = np.asarray(Image.open(io.BytesIO(png)))
    assert decoded.shape == (112, 112, 3) and decoded.dtype == np.uint8
    # hot (red) at the spot; far from it the cold map (about 0.15 there) barely tints the grey
    spot = decoded[7 * 4 - 4:7 * 4 + 4, 20 * 4 - 4:20 * 4 + 4].reshape(-1, 3).mean(axis=0)
    assert spot[0] > spot[2] + 40  # jet ends in dark red: (127, 0, 0) blended over grey
    corner = decoded[100:, :12].reshape(-1, 3).astype(int)
    assert 0 < (corner[:, 2] - corner[:, 0]).mean() < 30
    assert colormap(np.array([0.0]))[0].tolist()[2] > 100  # blue end
    assert colormap(np.array([1.0]))[0].tolist()[0] > 100  # red end
    with pytest.raises(InputError, match="does not match"):
        overlay(img, np.zeros((5, 5)))


# ------------------------------------------------------------- models users bring (.keras)
def _trained_spot_model(model, keras, epochs: int = 30):
    """Fit a user's model on bright-spot vs plain images, so its maps mean something."""
    rng = np.random.default_rng(5)
    plain = rng.integers(0, 40, size=(64, SIZE, SIZE, 1)).astype(np.uint8)
    spots = np.stack([_spot_image(rng, *rng.integers(4, SIZE - 4, 2)) for _ in range(64)])
    x = np.concatenate([plain, spots]).astype(np.float32) / 255.0
    y = np.r_[np.zeros(64), np.ones(64)].astype(int)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def test_user_sequential_model_from_a_keras_file(keras, tmp_path) -> None:
    """The issue's model: keras.Sequential([Conv2D, GlobalAveragePooling2D, Dense]) saved by a
    user and loaded from the file, as `medray models register` stores it. The old sub-model
    split gave a None gradient here and failed the whole report."""
    from medray.workers.gradcam import GradCam
    from medray.workers.models import load_model

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((SIZE, SIZE, 1)),
                              keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax")])
    _trained_spot_model(model, keras)
    path = tmp_path / "user.keras"
    model.save(path)
    loaded = load_model(str(path))
    cam = GradCam(loaded)
    assert cam.layer_name == loaded.layers[0].name  # the Conv2D
    rng = np.random.default_rng(6)
    x = np.stack([_spot_image(rng, 7, 20), _spot_image(rng, 20, 8)])
    logits = cam.logits(x / 255.0)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(axis=1, keepdims=True),
                               np.asarray(loaded(x.astype(np.float32) / 255.0)), atol=1e-5)
    maps = cam.heatmaps(x / 255.0, 1)
    assert maps.shape == (2, SIZE, SIZE) and maps.max() == pytest.approx(1.0)
    for m, (r, c) in zip(maps, [(7, 20), (20, 8)], strict=True):
        assert m[r - 3:r + 3, c - 3:c + 3].mean() > 2 * m.mean()  # the spot is what it saw


def test_functional_model_with_separate_activation_and_named_layer(keras) -> None:
    """Dense (linear) -> Activation("sigmoid") at the end, and --heatmap-layer choosing an
    earlier conv than the default."""
    from medray.workers.gradcam import GradCam

    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="early")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="late")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, keras.layers.Activation("sigmoid")(x))
    assert GradCam(model).layer_name == "late"
    cam = GradCam(model, layer_name="early")
    x = np.random.default_rng(7).integers(0, 255, size=(2, SIZE, SIZE, 1)).astype(np.uint8)
    np.testing.assert_allclose(1 / (1 + np.exp(-cam.logits(x))),
                               np.asarray(model(x.astype(np.float32))), atol=1e-5)
    maps = cam.heatmaps(x, [0, 2])
    assert maps.shape == (2, SIZE, SIZE) and np.isfinite(maps).all()
    with pytest.raises(InputError, match="no layer 'nope'.*--heatmap-layer"):
        GradCam(model, layer_name="nope")

