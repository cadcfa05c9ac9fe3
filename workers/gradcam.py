"""Grad-CAM (Selvaraju et al. 2017) for any Keras image classifier: medray's own models and the
``.keras`` files users register (Sequential, functional, with or without a nested backbone).

Pure TensorFlow plus Pillow: given a loaded Keras model and uint8 pixels, return a heatmap per
image and an overlay as PNG bytes. No storage, no Ray: the report job feeds it the top-scored
images of each label.

Choices, and why:
- The model is run as it is, whole; the feature map and the head's input are captured on the
  way through (the two layers' ``call`` wrapped for the duration of one forward pass). Cutting
  the graph into sub-models instead depends on how the model was built: a user's
  ``keras.Sequential`` of Conv2D -> GlobalAveragePooling2D -> Dense gave a sub-model whose
  outputs were not connected, hence a None gradient and a failed report.
- The class score is the logit (the final Dense layer's pre-activation), as in the paper. The
  sigmoid's slope vanishes on the confidently scored images a report shows (score 0.99999), which
  would leave an all-zero map; softmax would mix in the other classes.
- The feature map is the last convolutional output with at least 2x2 cells, nested backbones
  included, skipping pooling and padding layers (they only downsample or pad the same
  evidence); ``layer_name`` (``--heatmap-layer``) picks another. A 1x1 map (a backbone on tiny
  images) cannot say where anything is.
- What cannot be explained (no feature map, no Dense head, a layer off the path to the output)
  is an ``InputError`` saying why, which the report prints instead of heatmaps.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from medray.workers.errors import InputError

# Layers that only move or pick existing cells: the map before them says the same, unpadded.
_RESHAPING = ("MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
              "ZeroPadding2D", "Cropping2D")
# Layers that may follow a linear Dense and turn its logits into scores.
_SQUASH = ("Activation", "Softmax")


def _layers(model: Any) -> list[Any]:
    """Every layer in call order, nested models (backbones) opened in place."""
    import keras

    out: list[Any] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            out.extend(_layers(layer))
        else:
            out.append(layer)
    return out


def _is_map(layer: Any) -> bool:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):  # never called, or called on several inputs
        return False
    if shape is None or len(shape) != 4 or type(layer).__name__ in _RESHAPING:
        return False
    h, w = shape[1], shape[2]
    return h is not None and w is not None and h >= 2 and w >= 2


def _target_layer(model: Any, name: str | None) -> Any:
    layers = _layers(model)
    if name:
        found = [layer for layer in layers if layer.name == name]
        if not found:
            raise InputError(f"model {model.name!r} has no layer {name!r} for Grad-CAM "
                             "(--heatmap-layer); its layers: "
                             + ", ".join(layer.name for layer in layers[-12:]))
        return found[-1]
    # Only maps computed by learned weights: the input, its scaling and augmentation are
    # 4-D too, but a "heatmap" of them would just be the gradient of the pixels.
    maps, learned = [], False
    for layer in layers:
        learned = learned or bool(layer.weights)
        if learned and _is_map(layer):
            maps.append(layer)
    if not maps:
        raise InputError(
            f"model {model.name!r} has no convolutional feature map of at least 2x2 cells, so "
            "Grad-CAM cannot localise; use larger images or run the report without --heatmaps"
        )
    return maps[-1]


def _head(model: Any) -> Any:
    """The Dense layer whose pre-activation is the class logits: the last layer, or the one
    before a final softmax/sigmoid activation layer."""
    layers = model.layers
    last = layers[-1]
    if type(last).__name__ in _SQUASH and len(layers) > 1 \
            and type(layers[-2]).__name__ == "Dense":
        return layers[-2]
    if type(last).__name__ != "Dense":
        raise InputError(
            f"Grad-CAM needs a model ending in a Dense layer (the class logits); "
            f"{model.name!r} ends in {type(last).__name__}"
        )
    return last


@contextlib.contextmanager
def _capture(layer: Any, keep: Callable[[tuple[Any, ...], Any], Any], into: list[Any]
             ) -> Iterator[None]:
    """While inside, every call of ``layer`` appends ``keep(args, output)`` to ``into``."""
    original = layer.call

    def call(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        into.append(keep(args, out))
        return out

    object.__setattr__(layer, "call", call)  # Keras tracks attributes it is given; not this
    try:
        yield
    finally:
        object.__delattr__(layer, "call")


class GradCam:
    """Heatmaps for one loaded Keras model; build once, call per batch of images."""

    def __init__(self, model: Any, layer_name: str | None = None) -> None:
        self.model = model
        self.head = _head(model)
        self.n_outputs = int(self.head.units)
        self.target = _target_layer(model, layer_name)
        self.layer_name = self.target.name

    def _forward(self, inputs: Any) -> tuple[Any, Any]:
        """(feature map, logits) for a float32 tensor of pixels; record it under a tape."""
        import tensorflow as tf

        maps: list[Any] = []
        pens: list[Any] = []
        with _capture(self.target, lambda a, out: out, maps), \
                _capture(self.head, lambda a, out: a[0], pens):
            self.model(inputs, training=False)
        if not maps or not pens:
            raise InputError(f"layer {self.layer_name!r} or the head was not called in a "
                             "forward pass: pass --heatmap-layer with a layer of this model")
        pen = pens[-1]
        kernel = tf.cast(self.head.kernel, pen.dtype)
        logits = tf.matmul(pen, kernel)
        if self.head.bias is not None:
            logits = logits + tf.cast(self.head.bias, pen.dtype)
        return maps[-1], logits

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
        if grads is None:
            raise InputError(f"the class scores do not depend on layer {self.layer_name!r}: "
                             "pass --heatmap-layer with a layer on the path to the output")
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
