"""Keras model building and loading with Keras safe mode (the model card lives in
``model_card.py``; ``ModelCard`` is re-exported here for its many readers).

Preprocessing (scaling, grayscale-to-RGB for ImageNet backbones) is part of the model graph,
so a scorer feeds the uint8 pixels straight from the shards and a model file is self-contained.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Any

from medray.workers.errors import ConfigError, InputError
from medray.workers.model_card import ModelCard as ModelCard

# arch -> (keras.applications constructor, min input side, input scaling of that backbone)
BACKBONES: dict[str, tuple[str, int, str]] = {
    "mobilenet_v2": ("MobileNetV2", 32, "tf"),
    "efficientnet_b0": ("EfficientNetB0", 32, "raw"),
    "densenet121": ("DenseNet121", 32, "torch"),
    "inception_v3": ("InceptionV3", 75, "tf"),
}
ARCHS = ("small_cnn", *BACKBONES)


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


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation, as Keras preprocessing layers that are the identity at
    inference (so a saved model scores exactly like one trained without them).

    ``crop`` is the largest zoom-in (a random crop of up to that fraction, resized back),
    ``rotation`` a fraction of a full turn, ``brightness`` a fraction of the 0-255 range.

    The default instance is ``PRESETS["light"]``, training's recipe from 128 px (``AUTO``);
    it has no flip: a chest X-ray's left and right are anatomy (the heart's side). On
    PneumoniaMNIST it ranked, calibrated and kept specificity best together of the light
    settings measured (the preset before it was flip, crop 0.1, rotation 0.03; BENCHMARKS.md,
    "Quality").
    """

    flip: bool = False
    crop: float = 0.05
    rotation: float = 0.02
    brightness: float = 0.1

    def describe(self) -> str:
        return (f"flip={str(self.flip).lower()},crop={self.crop:g},rotation={self.rotation:g},"
                f"brightness={self.brightness:g}")


# --augment by name. "strong" is the recipe that met all four of issue 15's quality goals on
# PneumoniaMNIST at 28 px, with --calibration-form temperature+balanced-bias (it makes the model
# score clean images lower, a shift the balanced bias undoes); at 224 px it trained worse than
# the light preset (BENCHMARKS.md, "Quality").
PRESETS = {"light": Augment(), "strong": Augment(crop=0.25, rotation=0.08, brightness=0.3)}
# --augment-recipe auto (the default) is a preset by the images' side: below STRONG_BELOW_PX
# "strong", which at 28 and 64 px ranked as well as "light" and kept more normal test images
# under the validation threshold; from it on "light", which ranked better at 224 px
# (BENCHMARKS.md, "Quality"; small_cnn from scratch on PneumoniaMNIST).
AUTO = "auto"
STRONG_BELOW_PX = 128
# a crop of at least this much makes a model score clean images lower (a shift a temperature
# cannot undo): its default calibration is the class-balanced bias (workers/calibration.py)
SHIFTING_CROP = 0.15
_AUG_ALIASES = {"rotate": "rotation", "zoom": "crop", "flips": "flip"}
_ON = ("1", "true", "yes", "on", "default")
_OFF = ("", "0", "false", "no", "none", "off")


def parse_augment(value: bool | str | None) -> Augment | None:
    """--augment: false/none -> None; true/default/light -> the light preset; strong; or a list
    such as ``flip,crop=0.15,rotation=0.05`` (only the named transforms, others off)."""
    if value is None or value is False:
        return None
    if value is True:
        return Augment()
    text = str(value).strip().lower()
    if text in _OFF:
        return None
    if text in _ON:
        return Augment()
    if text in PRESETS:
        return PRESETS[text]
    if text == AUTO:  # a spec resolves it before anything builds layers
        raise ConfigError("--augment-recipe auto is chosen by the images' side: resolve it "
                          "with recipe_for(recipe, image_size) first")
    chosen: dict[str, Any] = {"flip": False, "crop": 0.0, "rotation": 0.0, "brightness": 0.0}
    defaults = Augment()
    for part in text.split(","):
        name, _, amount = part.strip().partition("=")
        name = _AUG_ALIASES.get(name, name)
        if name not in chosen:
            raise ConfigError(f"--augment-recipe: unknown transform or preset {name!r}; use "
                              f"{', '.join((AUTO, *PRESETS))}, or a list of flip, crop, rotation, "
                              "brightness (e.g. crop=0.25,rotation=0.02)")
        if name == "flip":
            chosen["flip"] = amount.strip() not in ("0", "false", "no", "off")
            continue
        try:
            fraction = float(amount) if amount else float(getattr(defaults, name))
        except ValueError:
            raise ConfigError(f"--augment-recipe: {name}={amount!r} is not a number") from None
        if not 0.0 <= fraction <= 0.5:
            raise ConfigError(f"--augment-recipe: {name}={fraction} must lie in [0, 0.5]")
        chosen[name] = fraction
    return Augment(**chosen)


def canonical_augment(recipe: str) -> str:
    """What a spec records for ``--augment-recipe``: ``auto``, a preset's name, or the list
    written out in full (``flip=false,crop=0.25,...``). ConfigError for what ``parse_augment``
    refuses, and for a recipe of no transforms (that is ``--no-augment``)."""
    if recipe.strip().lower() == AUTO:
        return AUTO
    chosen = parse_augment(recipe)
    if chosen is None or chosen == Augment(flip=False, crop=0.0, rotation=0.0, brightness=0.0):
        raise ConfigError(f"--augment-recipe {recipe!r} turns every transform off: use "
                          "--no-augment")
    named = [name for name, preset in PRESETS.items() if preset == chosen]
    return named[0] if named else chosen.describe()


def recipe_for(recipe: str, image_size: int) -> str:
    """The recipe a training on images of ``image_size`` px uses: ``auto`` becomes a preset by
    the side (``STRONG_BELOW_PX``), any other recipe stays as given."""
    if recipe != AUTO:
        return recipe
    return "strong" if image_size < STRONG_BELOW_PX else "light"


def shifts_scores(recipe: str) -> bool:
    """Whether a (resolved) recipe crops enough to lower a model's scores on clean images."""
    chosen = parse_augment(recipe)
    return chosen is not None and chosen.crop >= SHIFTING_CROP


def _augment_layers(keras: Any, aug: Augment, seed: int) -> list[Any]:
    layers: list[Any] = []
    if aug.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed, name="aug_flip"))
    if aug.crop > 0:
        layers.append(keras.layers.RandomZoom((-aug.crop, 0.0), seed=seed + 1, name="aug_crop"))
        layers.append(keras.layers.RandomTranslation(aug.crop / 2, aug.crop / 2, seed=seed + 2,
                                                     name="aug_shift"))
    if aug.rotation > 0:
        layers.append(keras.layers.RandomRotation(aug.rotation, seed=seed + 3, name="aug_rotate"))
    if aug.brightness > 0:
        layers.append(keras.layers.RandomBrightness(aug.brightness, value_range=(0, 255),
                                                    seed=seed + 4, name="aug_brightness"))
    return layers


def build_model(
    arch: str,
    input_size: int,
    channels: int,
    n_labels: int,
    multi_label: bool,
    weights: str = "none",
    dropout: float = 0.2,
    seed: int = 0,
    augment: Augment | None = None,
    standardize: bool = False,
) -> Any:
    """A classifier taking uint8-valued pixels (H, W, C) and giving one score per label.

    Layout: pixels -> [aug_* layers] -> scaling -> backbone -> ``features`` (a vector) ->
    ``dropout`` -> ``scores`` (Dense). ``--mode head`` trains only the last two.
    ``weights="imagenet"`` downloads through Keras; anything else starts from the seed.
    ``standardize`` (small_cnn): each image scaled to mean 0, variance 1 over its own pixels
    instead of by 1/255, in the graph, so scoring does exactly what training did.
    """
    import keras

    check_arch(arch, input_size)
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels}")
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_size, input_size, channels), name="pixels")
    x = inputs
    for layer in _augment_layers(keras, augment, seed) if augment else []:
        x = layer(x)
    activation = "sigmoid" if multi_label or n_labels == 1 else "softmax"
    if arch == "small_cnn":
        x = (keras.layers.LayerNormalization(axis=(1, 2, 3), epsilon=1e-3, center=False,
                                             scale=False, name="scale") if standardize
             else keras.layers.Rescaling(1.0 / 255, name="scale"))(x)
        # Large inputs (224 px X-rays) first go through strided stem convs down to <= 48 px,
        # so a CPU epoch over a few thousand images takes seconds, not minutes; at MNIST-like
        # sizes (28 px) there is no stem and the net is three conv blocks.
        side, stem = input_size, 0
        while side > 48:
            x = keras.layers.Conv2D(24, 3, strides=2, padding="same", use_bias=False,
                                    name=f"stem{stem}")(x)
            x = keras.layers.BatchNormalization(name=f"stem_bn{stem}")(x)
            x = keras.layers.Activation("relu", name=f"stem_relu{stem}")(x)
            side, stem = (side + 1) // 2, stem + 1
        for i, width in enumerate((32, 64, 128)):
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
            x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
            x = keras.layers.Activation("relu", name=f"relu{i}")(x)
            if min(x.shape[1], x.shape[2]) >= 4:
                x = keras.layers.MaxPooling2D(name=f"pool{i}")(x)
        x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    else:
        ctor_name, _, scheme = BACKBONES[arch]
        if channels == 1:  # ImageNet backbones want RGB: repeat the gray channel
            x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
        x = _scaling_layer(keras, scheme)(x)
        backbone = _backbone(keras, ctor_name, input_size, weights)
        x = keras.layers.Identity(name="features")(backbone(x))
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(n_labels, activation=activation, name="scores")(x)
    return keras.Model(inputs, outputs, name=f"medray_{arch}")


def check_arch(arch: str, input_size: int) -> None:
    """ConfigError (naming the fix) for an unknown arch or images too small for it."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if arch in BACKBONES and input_size < BACKBONES[arch][1]:
        raise ConfigError(f"{arch} needs images of at least {BACKBONES[arch][1]}px, the dataset "
                          f"has {input_size}px: stage it again with a larger --image-size")


def build_head(feature_dim: int, n_labels: int, multi_label: bool, dropout: float = 0.2,
               seed: int = 0) -> Any:
    """The trainable part of ``--mode head``: features -> dropout -> scores, with the same layer
    names as in ``build_model`` so its weights drop into the full model."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((feature_dim,), name="features")
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(inputs)
    activation = "sigmoid" if multi_label or n_labels == 1 else "softmax"
    outputs = keras.layers.Dense(n_labels, activation=activation, name="scores")(x)
    return keras.Model(inputs, outputs, name="medray_head")


HEAD_LAYERS = ("dropout", "scores")


def feature_extractor(model: Any) -> Any:
    """pixels -> the ``features`` vector of a model built by ``build_model`` (inference only)."""
    import keras

    try:
        features = model.get_layer("features")
    except ValueError as exc:
        raise InputError(f"model {model.name!r} has no 'features' layer: --mode head needs a "
                         "model built by medray") from exc
    return keras.Model(model.inputs, features.output, name=f"{model.name}_features")


def freeze_backbone(model: Any) -> int:
    """Freeze everything below the head (BatchNorm then runs in inference mode, as Keras does
    for frozen layers); returns how many weight tensors stay trainable."""
    for layer in model.layers:
        layer.trainable = layer.name in HEAD_LAYERS
    return len(model.trainable_weights)


def set_head(model: Any, head: Any) -> None:
    """Copy the head's trained ``scores`` weights into the full model."""
    model.get_layer("scores").set_weights(head.get_layer("scores").get_weights())


def _layer_weights(model: Any) -> dict[str, Any]:
    """{name: layer} for every layer with weights, nested models (backbones) flattened.

    Keyed by the layer's own name: a backbone's name carries the input size
    (``mobilenetv2_1.00_224``) while its layer names do not, so weights move between input
    sizes. A name seen twice is keyed by its full path instead.
    """
    import keras

    found: list[tuple[str, str, Any]] = []

    def walk(layer: Any, path: str) -> None:
        if isinstance(layer, keras.Model):
            for sub in layer.layers:
                walk(sub, f"{path}/{sub.name}")
        elif layer.weights:
            found.append((layer.name, path, layer))

    for layer in model.layers:
        walk(layer, layer.name)
    names = [n for n, _, _ in found]
    return {(n if names.count(n) == 1 else p): layer for n, p, layer in found}


def transfer_weights(source: Any, target: Any) -> tuple[int, list[str]]:
    """Copy weights layer by layer where the names and shapes match (a model with other labels
    gives everything but its head). Returns (tensors copied, target layers left as they were)."""
    src = _layer_weights(source)
    copied, skipped = 0, []
    for key, layer in _layer_weights(target).items():
        other = src.get(key)
        mine = layer.get_weights()
        theirs = other.get_weights() if other is not None else None
        if theirs is None or [w.shape for w in theirs] != [w.shape for w in mine]:
            skipped.append(key)
            continue
        layer.set_weights(theirs)
        copied += len(theirs)
    return copied, skipped


WEIGHT_SUFFIXES = (".keras", ".weights.h5", ".h5", ".hdf5")


def apply_weights_file(model: Any, path: str) -> str:
    """Load initial weights from a local file into ``model``; returns what was loaded.

    ``.keras``: a whole model; layers whose names and shapes match are copied (so a model with
    other labels gives everything but its head). ``.weights.h5``: Keras weights of this same
    architecture, or of its backbone alone. ``.h5``/``.hdf5``: Keras Applications weights of the
    backbone (the file ``--weights imagenet`` would download, fetched by hand).
    """
    import keras

    name = path.rsplit("/", 1)[-1]
    backbone = backbone_of(model)
    if path.endswith(".keras"):
        try:
            source = keras.saving.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:
            raise InputError(f"--weights {name}: not a loadable .keras model ({exc})") from exc
        copied, skipped = transfer_weights(source, model)
        if copied == 0:
            raise InputError(f"--weights {name}: no layer matches this {model.name} by name and "
                             "shape; pass weights of the same --arch")
        return f"{copied} tensors from {name} ({len(skipped)} layers kept: {skipped[:5]})"
    if not path.endswith(WEIGHT_SUFFIXES):
        raise InputError(f"--weights {name}: use a .keras, .weights.h5 or .h5 file")
    targets = [model] if path.endswith(".weights.h5") else []
    targets += [backbone] if backbone is not None else []
    if not targets:  # a legacy .h5 for a model without a backbone
        targets = [model]
    problems = []
    for target in targets:
        try:
            target.load_weights(path)
        except Exception as exc:  # noqa: BLE001 - try the next target, report all
            problems.append(f"{target.name}: {str(exc)[:160]}")
            continue
        return f"{len(target.weights)} tensors from {name} into {target.name}"
    raise InputError(f"--weights {name} does not fit this {model.name}: " + "; ".join(problems)
                     + ". Pass weights saved from the same --arch")


def _backbone(keras: Any, ctor_name: str, input_size: int, weights: str) -> Any:
    ctor = getattr(keras.applications, ctor_name)
    kw = {"include_top": False, "pooling": "avg", "input_shape": (input_size, input_size, 3)}
    if weights != "imagenet":
        return ctor(weights=None, **kw)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(IMAGENET_TIMEOUT_S)  # a blocked download must fail, not hang
    started = time.monotonic()
    try:
        return ctor(weights="imagenet", **kw)
    except Exception as exc:
        raise InputError(
            f"could not get ImageNet weights for {ctor_name} "
            f"({type(exc).__name__} after {time.monotonic() - started:.0f}s: "
            f"{str(exc)[:200]}): this machine cannot download them. Pass --weights PATH with a "
            ".keras, .weights.h5 or Keras Applications .h5 file instead (or put the file in "
            "~/.keras/models on every node)."
        ) from exc
    finally:
        socket.setdefaulttimeout(previous)


IMAGENET_TIMEOUT_S = 20.0


def backbone_of(model: Any) -> Any | None:
    """The nested ImageNet backbone of a model built here, if any."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    return None


def import_tensorflow() -> float:
    """Import TensorFlow for loading and running models, without the scikit-learn that Keras
    pulls in with it; returns the seconds the import took (0 when already imported).

    Keras 3 imports scikit-learn (and SciPy's stats with it) whenever it is installed, only for
    its scikit-learn wrapper classes, which loading or running a model never uses: about 0.65 s
    of a 2.9 s import on 2 cores (BENCHMARKS.md, Start-up), paid by every scorer actor. While
    TensorFlow loads, scikit-learn is marked missing; the mark goes at once, so a later
    ``import sklearn`` in the process works as usual (only Keras's wrappers stay off).
    """
    import sys

    if "tensorflow" in sys.modules:
        return 0.0
    started = time.perf_counter()
    hide = "sklearn" not in sys.modules
    if hide:
        sys.modules["sklearn"] = None  # type: ignore[assignment] # Python's "not installed" mark
    try:
        import tensorflow  # noqa: F401 - the import is the point
    finally:
        if hide and "sklearn" in sys.modules and sys.modules["sklearn"] is None:
            del sys.modules["sklearn"]
    return time.perf_counter() - started


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
        with contextlib.suppress(RuntimeError):  # already initialised in this process
            tf.config.experimental.set_memory_growth(gpu, True)
    if mixed_precision:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
