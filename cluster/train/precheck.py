"""Checks of a train spec before anything runs: in the CLI process (no Ray, no TensorFlow) and
again on the job driver, so bad input exits 2 without waiting for a cluster.

Checked: the dataset and its labels, the arch against the image size, ``--weights`` (and
whether ImageNet weights can be downloaded, where this machine's network is the cluster's),
``--operating-point`` labels, the ``--card-file``, and that ``--run-id`` does not name a
started training without ``--resume``.
"""

from __future__ import annotations

from typing import Any

import yaml

from medray.cluster.infra import ray_local
from medray.cluster.store import catalog
from medray.cluster.store.lake import Lake, source_filesystem
from medray.cluster.train import checkpoints
from medray.cluster.train.weights import imagenet_reachable, resolve_weights
from medray.workers.errors import ConfigError, InputError
from medray.workers.models import BACKBONES, check_arch
from medray.workers.operating_points import check_labels, parse
from medray.workers.specs import TrainSpec


def precheck(spec: TrainSpec, lake: Lake, address: str | None) -> None:
    """The CLI's check before submission; the network is checked only for a local cluster."""
    check(spec, lake, check_network=ray_local.is_local(address))


def check(spec: TrainSpec, lake: Lake, check_network: bool = True) -> None:
    """ConfigError or InputError, each naming the fix, for what can be known without running."""
    _, _, manifest = catalog.resolve(lake, spec.dataset)
    check_arch(spec.arch, int(manifest["image_size"]))
    if not manifest.get("labels"):
        raise ConfigError(f"dataset {spec.dataset} has no labels to train on")
    if spec.weights == "imagenet" and spec.arch not in BACKBONES:
        raise ConfigError("--weights imagenet needs an ImageNet --arch ("
                          f"{', '.join(BACKBONES)}); small_cnn has no pretrained weights")
    if spec.weights == "imagenet" and check_network and not imagenet_reachable(spec.arch):
        raise InputError(f"--weights imagenet: cannot reach storage.googleapis.com and no cached "
                         f"{spec.arch} weights in ~/.keras/models; pass --weights PATH with a "
                         ".keras, .weights.h5 or Keras Applications .h5 file instead")
    check_labels(parse(spec.operating_point), list(manifest["labels"]))
    card_file(spec)
    # a resumed training may find its uploaded copy of a local file that is gone by now
    resolve_weights(lake, spec.weights, spec.model, spec.run_id if spec.resume else None)
    checkpoints.refuse_restart(lake, spec)


# what a --card-file may say; every value is text or a list of texts
CARD_FILE_KEYS = ("intended_use", "out_of_scope", "users", "limitations",
                  "ethical_considerations")


def card_file(spec: TrainSpec) -> dict[str, Any]:
    """The model card text of ``--card-file`` (YAML or JSON), keyed as the card's
    ``intended_use`` takes it; {} without one. InputError naming the fix when unreadable."""
    if not spec.card_file:
        return {}
    fs, path = source_filesystem(spec.card_file)
    try:
        with fs.open_input_stream(path) as fh:
            doc = yaml.safe_load(fh.read().decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"--card-file {spec.card_file} not found") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"--card-file {spec.card_file} is not YAML or JSON text: {exc}") \
            from None
    if not isinstance(doc, dict) or set(doc) - set(CARD_FILE_KEYS):
        raise InputError(f"--card-file {spec.card_file}: give a mapping with keys from "
                         f"{', '.join(CARD_FILE_KEYS)}")
    out: dict[str, Any] = {}
    for key, value in doc.items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and v.strip() for v in items):
            raise InputError(f"--card-file {spec.card_file}: {key} must be text or a list of "
                             "texts")
        out[key] = items if key in ("out_of_scope", "limitations",
                                    "ethical_considerations") else "; ".join(items)
    if "intended_use" in out:
        out["primary"] = out.pop("intended_use")
    return out
