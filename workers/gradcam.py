"""Grad-CAM (Selvaraju et al. 2017) for the classifiers built by ``workers/models.py``.

Pure TensorFlow plus Pillow: given a loaded Keras model and uint8 pixels, return a heatmap per
image and an overlay as PNG bytes. No storage, no Ray: the report job feeds it the top-scored
images of each label.

Choices, and why:
- The class score is the logit (the final Dense layer's pre-activation), as in the paper. The
  sigmoid's slope vanishes on the confidently scored images a report shows (score 0.99999), which
  would leave an all-zero map; softmax would mix in the other classes.
- The feature map is the last convolutional output with at least 2x2 cells, skipping pooling
  and padding layers (they only downsample or pad the same evidence). A 1x1 map (a backbone on
  tiny images) cannot say where anything is.
- Backbone models (a nested ``keras.Model``) are split into prefix -> backbone -> head, which is
  the layout ``build_model`` produces; other layouts raise ``InputError`` naming what is missing.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from medray.workers.errors import InputError

# Layers that only move or pick existing cells: the map before them says the same, unpadded.
_RESHAPING = ("MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
              "ZeroPadding2D", "Cropping2D")
# Layers that are the identity at inference time and may sit between the features and the head.
_PASS_THROUGH = ("Dropout", "Identity", "SpatialDropout2D", "GaussianNoise", "GaussianDropout")


def _is_map(layer: Any) -> bool:
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    if shape is None or len(shape) != 4 or type(layer).__name__ in _RESHAPING:
        return False
    h, w = shape[1], shape[2]
    return h is not None and w is not None and h >= 2 and w >= 2


def _target_layer(model: Any, name: str | None) -> Any:
    if name:
        try:
            return model.get_layer(name)
        except ValueError as exc:
            raise InputError(f"model has no layer {name!r} for Grad-CAM") from exc
    # Only maps computed by learned weights: the input, its scaling and augmentation are
    # 4-D too, but a "heatmap" of them would just be the gradient of the pixels.
    maps, learned = [], False
    for layer in model.layers:
        learned = learned or bool(layer.weights)
        if learned and _is_map(layer):
            maps.append(layer)
    if not maps:
        raise InputError(
            f"model {model.name!r} has no convolutional feature map of at least 2x2 cells, so "
            "Grad-CAM cannot localise; use larger images or run the report without --heatmaps"
        )
    return maps[-1]


def _single(model: Any) -> Any:
    # One input as a tensor, not a list of one: the sub-models are called on a bare tensor and
    # Keras warns when the structures differ.
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


@dataclass
class _Graph:
    prefix: Any | None  # outer input -> backbone input (None when there is no backbone)
    features: Any  # (backbone or whole model) input -> [feature map, penultimate vector]
    kernel: Any
    bias: Any
    layer_name: str


class GradCam:
    """Heatmaps for one loaded Keras model; build once, call per batch of images."""

    def __init__(self, model: Any, layer_name: str | None = None) -> None:
        import keras

        from medray.workers.models import backbone_of

        self.model = model
        head = model.layers[-1]
        if type(head).__name__ != "Dense" or head.bias is None:
            raise InputError(
                f"Grad-CAM needs a model ending in a Dense layer with bias (the class logits); "
                f"{model.name!r} ends in {type(head).__name__}"
            )
        self.n_outputs = int(head.units)
        backbone = backbone_of(model)
        if backbone is None:
            target = _target_layer(model, layer_name)
            features = keras.Model(_single(model), [target.output, head.input])
            self._graph = _Graph(None, features, head.kernel, head.bias, target.name)
        else:
            self._graph = self._split(keras, model, backbone, head, layer_name)
        self.layer_name = self._graph.layer_name

    @staticmethod
    def _split(keras: Any, model: Any, backbone: Any, head: Any, layer_name: str | None) -> _Graph:
        layers = list(model.layers)
        i = layers.index(backbone)
        between = layers[i + 1 : -1]
        odd = [type(layer).__name__ for layer in between
               if type(layer).__name__ not in _PASS_THROUGH]
        if odd:
            raise InputError(
                f"Grad-CAM expects backbone -> [dropout] -> Dense, found {odd} between them: "
                "heatmaps support the layouts that `medray train` builds"
            )
        prefix = keras.Model(_single(model), layers[i - 1].output) if i > 1 else None
        target = _target_layer(backbone, layer_name)
        features = keras.Model(_single(backbone), [target.output, backbone.output])
        return _Graph(prefix, features, head.kernel, head.bias, target.name)

    def _forward(self, inputs: Any) -> tuple[Any, Any]:
        """(feature map, logits) for a float32 tensor of pixels."""
        import tensorflow as tf

        g = self._graph
        if g.prefix is not None:
            inputs = g.prefix(inputs, training=False)
        fmap, pen = g.features(inputs, training=False)
        logits = tf.matmul(pen, tf.cast(g.kernel, pen.dtype)) + tf.cast(g.bias, pen.dtype)
        return fmap, logits

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """The class logits the maps explain; the model's output is their sigmoid/softmax."""
        import tensorflow as tf

        x = tf.convert_to_tensor(np.asarray(pixels, dtype=np.float32))
        return np.asarray(self._forward(x)[1], dtype=np.float32)

    def heatmaps(self, pixels: np.ndarray, label_index: int | np.ndarray) -> np.ndarray:
        """(n, H, W) maps in [0, 1] for uint8 ``pixels`` (n, H, W, C), at the input size.

        ``label_index`` is one output index for every image or one per image. A map that is
        zero everywhere means no cell raised the class logit (returned as zeros, not NaN).
        """
        import tensorflow as tf

        x = np.asarray(pixels)
        if x.ndim != 4:
            raise InputError(f"pixels must be (n, H, W, C), got shape {x.shape}")
        idx = np.broadcast_to(np.asarray(label_index, dtype=np.int64), (x.shape[0],))
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_outputs):
            raise InputError(f"label index out of range 0..{self.n_outputs - 1}: {idx.tolist()}")
        if x.shape[0] == 0:
            return np.zeros((0, x.shape[1], x.shape[2]), dtype=np.float32)
        inputs = tf.convert_to_tensor(x.astype(np.float32))
        with tf.GradientTape() as tape:
            # Watch the input so the path to the feature map is recorded even when every weight
            # is frozen (a head-only fine-tune leaves the backbone non-trainable).
            tape.watch(inputs)
            fmap, logits = self._forward(inputs)
            chosen = tf.gather(logits, tf.constant(idx), axis=1, batch_dims=1)
        grads = tape.gradient(chosen, fmap)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * fmap, axis=-1))[..., None]
        cam = tf.image.resize(cam, (x.shape[1], x.shape[2]), method="bilinear")[..., 0]
        cam = cam.numpy().astype(np.float32)
        peak = cam.reshape(cam.shape[0], -1).max(axis=1)
        scale = np.divide(1.0, peak, out=np.zeros_like(peak), where=peak > 0)
        return np.clip(cam * scale[:, None, None], 0.0, 1.0)


def colormap(values: np.ndarray) -> np.ndarray:
    """A jet-like map of [0, 1] values to uint8 RGB (blue = low, red = high), numpy only."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4.0 * v - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * v - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * v - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heatmap over a uint8 image (H, W), (H, W, 1) or (H, W, 3); returns (H, W, 3)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise InputError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got {img.shape}")
    if heatmap.shape != img.shape[:2]:
        raise InputError(f"heatmap {heatmap.shape} does not match image {img.shape[:2]}")
    rgb = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
    # Weight the colour by the map so cold regions keep the radiograph readable.
    a = (alpha * np.clip(heatmap, 0.0, 1.0))[..., None]
    out = (1.0 - a) * rgb.astype(np.float32) + a * colormap(heatmap).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def to_png(rgb: np.ndarray, size: int | None = None) -> bytes:
    """PNG bytes of a uint8 image, upscaled (nearest: no invented detail) to ``size`` pixels."""
    from PIL import Image

    arr = np.asarray(rgb, dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    if size and max(img.size) < size:
        factor = size / max(img.size)
        img = img.resize((round(img.size[0] * factor), round(img.size[1] * factor)),
                         Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def overlay_pngs(
    cam: GradCam, pixels: np.ndarray, label_index: int | np.ndarray, size: int | None = 224
) -> list[bytes]:
    """One overlay PNG per image: the image with its Grad-CAM for ``label_index`` on top."""
    maps = cam.heatmaps(pixels, label_index)
    return [to_png(overlay(p, m), size) for p, m in zip(np.asarray(pixels), maps, strict=True)]
