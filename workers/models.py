"""Keras model building, the model card, and loading with Keras safe mode.

Preprocessing (scaling, grayscale-to-RGB for ImageNet backbones) is part of the model graph,
so a scorer feeds the uint8 pixels straight from the shards and a model file is self-contained.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from medray.workers.errors import ConfigError, InputError

# arch -> (keras.applications constructor, min input side, input scaling of that backbone)
BACKBONES: dict[str, tuple[str, int, str]] = {
    "mobilenet_v2": ("MobileNetV2", 32, "tf"),
    "efficientnet_b0": ("EfficientNetB0", 32, "raw"),
    "densenet121": ("DenseNet121", 32, "torch"),
    "inception_v3": ("InceptionV3", 75, "tf"),
}
ARCHS = ("small_cnn", *BACKBONES)


@dataclass
class ModelCard:
    name: str
    labels: list[str]
    multi_label: bool
    input_size: int
    channels: int
    arch: str
    version: int | None = None
    preprocessing: str = "uint8 pixels in; scaling inside the model"
    thresholds: dict[str, float] = field(default_factory=dict)
    dataset: str | None = None
    dataset_version: int | None = None
    weights: str = "none"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_seconds: float | None = None
    code_version: str | None = None
    created_at: str | None = None
    source: str = "trained"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def threshold(self, label: str) -> float:
        return float(self.thresholds.get(label, 0.5))


def _scaling_layer(keras: Any, scheme: str) -> Any:
    if scheme == "tf":  # [-1, 1]
        return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale")
    if scheme == "torch":  # ImageNet mean/std on [0, 1]
        return keras.layers.Normalization(
            mean=[0.485 * 255, 0.456 * 255, 0.406 * 255],
            variance=[(0.229 * 255) ** 2, (0.224 * 255) ** 2, (0.225 * 255) ** 2],
            name="scale",
        )
    return keras.layers.Identity(name="scale")  # EfficientNet rescales inside itself


def build_model(
    arch: str,
    input_size: int,
    channels: int,
    n_labels: int,
    multi_label: bool,
    weights: str = "none",
    dropout: float = 0.2,
    seed: int = 0,
) -> Any:
    """A classifier taking uint8-valued pixels (H, W, C) and giving one score per label."""
    import keras

    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_size, input_size, channels), name="pixels")
    activation = "sigmoid" if multi_label or n_labels == 1 else "softmax"
    if arch == "small_cnn":
        x = keras.layers.Rescaling(1.0 / 255, name="scale")(inputs)
        for i, width in enumerate((32, 64, 128)):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
            x = keras.layers.Activation("relu")(x)
            if min(x.shape[1], x.shape[2]) >= 4:
                x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
        x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    else:
        ctor_name, min_side, scheme = BACKBONES[arch]
        if input_size < min_side:
            raise ConfigError(f"{arch} needs images of at least {min_side}px; stage larger ones")
        x = inputs
        if channels == 1:  # ImageNet backbones want RGB: repeat the gray channel
            x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
        x = _scaling_layer(keras, scheme)(x)
        backbone = _backbone(keras, ctor_name, input_size, weights)
        x = backbone(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_labels, activation=activation, name="scores")(x)
    return keras.Model(inputs, outputs, name=f"medray_{arch}")


def _backbone(keras: Any, ctor_name: str, input_size: int, weights: str) -> Any:
    ctor = getattr(keras.applications, ctor_name)
    kw = {"include_top": False, "pooling": "avg", "input_shape": (input_size, input_size, 3)}
    if weights != "imagenet":
        return ctor(weights=None, **kw)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a blocked download must fail, not hang
    started = time.monotonic()
    try:
        return ctor(weights="imagenet", **kw)
    except Exception as exc:
        raise InputError(
            f"could not get ImageNet weights for {ctor_name} "
            f"({type(exc).__name__} after {time.monotonic() - started:.0f}s): this machine cannot "
            "download them. Pass --weights PATH with a .keras or .weights.h5 file instead."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


def backbone_of(model: Any) -> Any | None:
    """The nested ImageNet backbone of a model built here, if any."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    return None


def load_model(path: str) -> Any:
    """Load a .keras file with safe mode on: no arbitrary code (lambdas) from the lake."""
    import keras

    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as exc:
        raise InputError(f"cannot load model {path}: {exc}") from exc


def configure_tensorflow(mixed_precision: bool = False) -> None:
    """One whole GPU per process with memory growth on (TF otherwise grabs it all)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process
            pass
    if mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
