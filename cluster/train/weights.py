"""Where a training's initial weights come from (``--weights``), and the model it starts from.

``--weights`` names no weights (``none``), a Keras Applications download (``imagenet``), a file
(``.keras``, ``.weights.h5``, ``.h5``) or an earlier model version. A local file is uploaded
beside the training in the lake, because workers on other nodes cannot see this machine's disk;
its SHA-256 names it for the feature cache. Resolving never imports TensorFlow, so the CLI can
check ``--weights`` before submitting.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from medray.cluster.store import layout, registry
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, NotFoundError
from medray.workers.models import WEIGHT_SUFFIXES, Augment

WeightsKind = Literal["none", "imagenet", "file", "model"]

# Keras Applications file name prefixes, to tell whether ImageNet weights are cached already
_IMAGENET_FILES = {"mobilenet_v2": "mobilenet_v2_weights", "efficientnet_b0": "efficientnetb0",
                   "densenet121": "densenet121_weights", "inception_v3": "inception_v3_weights"}
_IMAGENET_HOST = ("storage.googleapis.com", 443)


@dataclass(frozen=True)
class InitWeights:
    """Where the initial weights come from. ``identity`` names them for the feature cache."""

    kind: WeightsKind
    identity: str
    path: str | None = None  # lake-relative file (kind file) or model file (kind model)
    source: str = "none"  # as the user gave it, for the model card


@dataclass(frozen=True)
class ModelShape:
    """What a model's architecture depends on; the driver, the feature actors and the training
    workers build the same model from it."""

    arch: str
    image_size: int
    channels: int
    n_labels: int
    multi_label: bool
    seed: int


def _kind(weights: str) -> WeightsKind:
    if weights == "none":
        return "none"
    if weights == "imagenet":
        return "imagenet"
    if weights.lower().endswith(WEIGHT_SUFFIXES):
        return "file"
    return "model"


def resolve_weights(lake: Lake, weights: str, model: str, train_id: str | None) -> InitWeights:
    """Check ``--weights``; a local file is uploaded beside training ``train_id`` of ``model``
    (none yet when ``train_id`` is None: then it is only checked)."""
    kind = _kind(weights)
    if kind in ("none", "imagenet"):
        return InitWeights(kind, kind, source=kind)
    if kind == "file":
        return _weights_file(lake, weights, model, train_id)
    try:
        card = registry.resolve(lake, weights)
    except ConfigError as exc:
        raise ConfigError(f"--weights {weights!r}: use none, imagenet, a .keras/.weights.h5/.h5 "
                          "file or an earlier model as NAME:VERSION") from exc
    if card.version is None:  # a card that was never registered has no file in the lake
        raise NotFoundError(f"--weights {weights!r}: model {card.name!r} has no registered "
                            "version to start from")
    return InitWeights("model", f"model:{card.name}:{card.version}",
                       layout.model_file(card.name, card.version), weights)


def _weights_file(lake: Lake, weights: str, model: str, train_id: str | None) -> InitWeights:
    local = Path(weights).expanduser()
    uploaded = layout.training_init(model, train_id, local.name) if train_id else None
    rel: str | None
    if local.is_file():
        data = local.read_bytes()
        rel = uploaded
        if rel and not lake.exists(rel):
            lake.write_bytes(rel, data)
    else:
        # a resumed training finds the copy it uploaded, even if the local file is gone
        in_lake = None if weights.startswith("/") else weights
        rel = next((c for c in (uploaded, in_lake) if c and lake.exists(c)), None)
        if rel is None:
            raise NotFoundError(f"--weights {weights}: no such file here or in the lake "
                                f"{lake.uri}; give a local path or a lake-relative path")
        data = lake.read_bytes(rel)
    return InitWeights("file", "file:" + hashlib.sha256(data).hexdigest(), rel, weights)


def imagenet_reachable(arch: str, timeout_s: float = 3.0) -> bool:
    """Cached Keras Applications weights, or a TCP connection to their host; no TensorFlow."""
    cache = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"
    prefix = _IMAGENET_FILES.get(arch, arch)
    if cache.is_dir() and any(p.name.startswith(prefix) for p in cache.iterdir()):
        return True
    try:
        with socket.create_connection(_IMAGENET_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False


def initial_model(lake: Lake, init: InitWeights, shape: ModelShape,
                  augment: Augment | None = None) -> tuple[Any, str]:
    """(the model training starts from, what was loaded): built from the seed (or ImageNet),
    then the ``--weights`` file or model on top."""
    from medray.workers.models import apply_weights_file, build_model

    model = build_model(shape.arch, shape.image_size, shape.channels, shape.n_labels,
                        shape.multi_label,
                        weights="imagenet" if init.kind == "imagenet" else "none",
                        seed=shape.seed, augment=augment)
    note: str = init.kind if init.kind in ("none", "imagenet") else ""
    if init.kind in ("file", "model") and init.path:
        with tempfile.TemporaryDirectory() as tmp:
            note = apply_weights_file(model, _local_copy(lake, init.path, tmp))
    return model, note


def _local_copy(lake: Lake, rel: str, tmp: str) -> str:
    """Keras picks the loader by suffix, so the copy keeps the lake file's."""
    suffix = next((s for s in WEIGHT_SUFFIXES if rel.lower().endswith(s)), ".keras")
    path = Path(tmp) / f"init{suffix}"
    path.write_bytes(lake.read_bytes(rel))
    return str(path)
