"""Pure TensorFlow training pieces: batch arithmetic, losses with class weights, the distributed
train step, BatchNorm statistics for inference, evaluation, early stopping, optimizer state for
exact resume and the feature-cache key. No Ray, no storage."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medray.workers import metrics
from medray.workers.errors import ConfigError

FEATURES_FORMAT = 1  # bump when the cached feature layout or meaning changes
# Training images (the last ones of an epoch) that re-estimate BatchNorm's inference statistics
# before each validation: enough for per-channel moments over many pixels each, a few per cent
# of an epoch's compute.
BN_IMAGES = 1024


@dataclass(frozen=True)
class BatchPlan:
    """Every worker runs exactly ``steps`` steps of ``local_batch`` images per epoch.

    Collective all-reduces need every worker in every step: one worker with an extra batch
    would wait forever for the others. Ray's ``streaming_split(equal=True)`` gives each worker
    floor(rows / world) rows, and floor(floor(rows / world) / local) == rows // global, so with
    ``drop_last`` every worker sees the same number of full batches; the cap is a second guard.
    """

    local_batch: int
    global_batch: int
    steps: int
    per_replica: int


def plan_batches(rows: int, batch_size: int, world: int, local_replicas: int = 1) -> BatchPlan:
    if world < 1 or local_replicas < 1:
        raise ConfigError("need at least one worker and one device per worker")
    per_replica = batch_size // (world * local_replicas)
    if per_replica < 1:
        raise ConfigError(f"--batch-size {batch_size} is smaller than the {world * local_replicas} "
                          "replicas: raise --batch-size or lower --workers")
    local = per_replica * local_replicas
    global_batch = local * world
    steps = rows // global_batch
    if steps < 1:
        raise ConfigError(f"only {rows} labelled training images, fewer than one global batch of "
                          f"{global_batch}: lower --batch-size or stage more images")
    return BatchPlan(local, global_batch, steps, per_replica)


def class_weights(counts: dict[str, int], labels: Sequence[str], total: int,
                  multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) weight per label.

    Multi-label uses CheXNet's weighted binary cross-entropy (Rajpurkar et al. 2017):
    w+ = |N| / (|P| + |N|), w- = |P| / (|P| + |N|) per label, so rare findings are not drowned out.
    Single-label uses inverse class frequency, n / (k * n_c), on the true class's log-likelihood
    (the usual ``class_weight="balanced"``); the negative weight is unused (ones).
    """
    if total < 1:
        raise ConfigError("no labelled training images to weight")
    pos = np.array([min(total, max(1, counts.get(lab, 0))) for lab in labels], dtype=np.float64)
    if multi_label:
        neg = np.maximum(1.0, total - pos)
        return (neg / total).astype(np.float32), (pos / total).astype(np.float32)
    w = total / (len(labels) * pos)
    return w.astype(np.float32), np.ones_like(w, dtype=np.float32)


def make_loss(multi_label: bool, pos_w: np.ndarray | None, neg_w: np.ndarray | None) -> Any:
    """Per-example loss (shape [batch]); the caller averages over the global batch."""
    import tensorflow as tf

    eps = 1e-7
    pw = tf.constant(pos_w if pos_w is not None else 1.0, tf.float32)
    nw = tf.constant(neg_w if neg_w is not None else 1.0, tf.float32)

    def loss(y_true: Any, y_pred: Any) -> Any:
        y_true = tf.cast(y_true, tf.float32)
        y_pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), eps, 1 - eps)
        if multi_label:
            terms = -(pw * y_true * tf.math.log(y_pred)
                      + nw * (1 - y_true) * tf.math.log(1 - y_pred))
            return tf.reduce_mean(terms, axis=-1)
        return -tf.reduce_sum(pw * y_true * tf.math.log(y_pred), axis=-1)

    return loss


def local_replicas(strategy: Any) -> int:
    """Devices (replicas) this worker drives: 1 on CPU, the GPUs given to it otherwise."""
    try:
        return max(1, len(strategy.extended.worker_devices))
    except RuntimeError:  # the default (no-op) strategy has no device list: one replica
        return 1


def make_train_step(strategy: Any, model: Any, optimizer: Any, loss_fn: Any,
                    global_batch: int) -> Any:
    """A distributed step: strategy.run + strategy.reduce, avoiding Keras 3 model.fit under
    MultiWorkerMirroredStrategy (ray-project/ray#47464). Takes this worker's numpy batch,
    splits it over its local replicas and returns the global mean loss."""
    import tensorflow as tf

    n_local = local_replicas(strategy)

    def step_fn(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            pred = model(tf.cast(x, tf.float32), training=True)
            per_example = loss_fn(y, pred)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def step(x: Any, y: Any) -> Any:
        per_replica = strategy.run(step_fn, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def train_step(x: np.ndarray, y: np.ndarray) -> Any:
        if n_local == 1:
            return step(x, y)
        part = len(x) // n_local

        def piece(arr: np.ndarray) -> Any:
            return strategy.experimental_distribute_values_from_function(
                lambda ctx: arr[(ctx.replica_id_in_sync_group % n_local) * part:][:part])

        return step(piece(x), piece(y))

    return train_step


def batchnorm_layers(model: Any) -> list[Any]:
    """The BatchNormalization layers that train (nested backbones included); a frozen one keeps
    its statistics, as Keras runs it in inference mode."""
    import keras

    found: list[Any] = []

    def walk(layer: Any) -> None:
        if isinstance(layer, keras.layers.BatchNormalization):
            if layer.trainable:
                found.append(layer)
            return
        for sub in getattr(layer, "layers", None) or ():
            walk(sub)

    walk(model)
    return found


def precise_batchnorm(model: Any, batches: Sequence[np.ndarray]) -> int:
    """Set every training BatchNorm's moving mean and variance to the moments of its input over
    ``batches`` under the current weights ("precise BN", Wu & Johnson 2021); returns how many
    layers were set.

    Why: the moving averages (momentum 0.99, a memory of ~100 steps) lag the weights. Under
    Adam at the default learning rate the pre-BN activations of small_cnn shift by 0.2-1.0
    standard deviations within that memory, so inference-mode outputs were far from what the
    network learned: on PneumoniaMNIST the validation loss jumped between 0.3 and 14.7 from
    epoch to epoch while the training loss fell; with fresh statistics it stays at 0.14-0.30
    (BENCHMARKS.md, "Quality"). Each batch runs in training mode with momentum 0, which leaves
    that batch's moments in the moving variables; the union of the batches' moments (within-
    plus between-batch variance) is then assigned. The batches skip the model's ``aug_*``
    layers (they run in training mode too): inference sees unaugmented images, so the
    statistics must be theirs, or augmentation turns into a bias at inference.
    """
    layers = batchnorm_layers(model)
    batches = [b for b in batches if len(b)]
    if not layers or not batches:
        return 0
    import tensorflow as tf

    momenta = [layer.momentum for layer in layers]
    means: list[list[np.ndarray]] = [[] for _ in layers]
    variances: list[list[np.ndarray]] = [[] for _ in layers]
    try:
        for layer in layers:
            layer.momentum = 0.0  # read when traced below: moving stats = this batch's
        plain = unaugmented(model)
        forward = tf.function(lambda x: plain(x, training=True), reduce_retracing=True)
        for x in batches:
            forward(tf.cast(x, tf.float32))
            for i, layer in enumerate(layers):
                means[i].append(np.asarray(layer.moving_mean.numpy(), np.float64))
                variances[i].append(np.asarray(layer.moving_variance.numpy(), np.float64))
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
    w = np.array([len(b) for b in batches], np.float64)
    w /= w.sum()
    for i, layer in enumerate(layers):
        m, v = np.stack(means[i]), np.stack(variances[i])
        mean = w @ m
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign((w @ v + w @ (m - mean) ** 2).astype(np.float32))
    return len(layers)


def unaugmented(model: Any) -> Any:
    """The model from just after its last ``aug_*`` layer (shared layers, no copy); the model
    itself when it has none."""
    import keras

    aug = [layer for layer in model.layers if layer.name.startswith("aug_")]
    if not aug:
        return model
    return keras.Model(aug[-1].output, model.output, name=f"{model.name}_unaugmented")


def predict(model: Any, batches: Iterable[np.ndarray]) -> np.ndarray:
    outs = [np.asarray(model(np.asarray(x, np.float32), training=False)) for x in batches]
    return np.concatenate(outs) if outs else np.zeros((0, model.output_shape[-1]), np.float32)


def mean_loss(loss_fn: Any, y: np.ndarray, scores: np.ndarray) -> float:
    if not len(y):
        return float("nan")
    return float(np.mean(np.asarray(loss_fn(y, scores))))


def evaluate(y: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Per-label AUROC and the mean over labels that have both classes."""
    per_label = {}
    for j, lab in enumerate(labels):
        per_label[lab] = metrics.auroc(y[:, j], scores[:, j]) if len(y) else float("nan")
    finite = [v for v in per_label.values() if np.isfinite(v)]
    return {"auroc": per_label, "mean_auroc": float(np.mean(finite)) if finite else float("nan")}


def new_state() -> dict[str, Any]:
    return {"epoch": 0, "best_auroc": None, "best_epoch": 0, "bad_epochs": 0, "history": [],
            "stopped": None}


def end_epoch(state: dict[str, Any], record: dict[str, Any], patience: int,
              max_epochs: int) -> tuple[bool, bool]:
    """Book one epoch into ``state``: (improved, stop).

    Best = highest mean validation AUROC. An epoch without a finite AUROC (validation has one
    class) never counts as best, except that the last epoch is kept when none ever was, so a
    model is always registered. ``stopped`` says why training ended early.
    """
    epoch, raw = int(record["epoch"]), record.get("val_mean_auroc")
    auc = float(raw) if raw is not None else math.nan
    finite = math.isfinite(auc)
    best = state["best_auroc"]
    improved = finite and (best is None or auc > best)
    if not improved and best is None and not finite and epoch == max_epochs:
        improved = True  # nothing better exists: keep the last weights
    state["history"].append(record)
    state["epoch"] = epoch
    if improved:
        state["best_auroc"] = auc if finite else None
        state["best_epoch"] = epoch
        state["bad_epochs"] = 0
    else:
        state["bad_epochs"] += 1
    stop = state["bad_epochs"] >= patience and epoch < max_epochs
    if stop:
        state["stopped"] = f"no validation AUROC gain in {patience} epochs"
    return improved, stop


def finished(state: dict[str, Any], max_epochs: int) -> bool:
    return bool(state.get("stopped")) or int(state["epoch"]) >= max_epochs


def optimizer_state(optimizer: Any) -> dict[str, np.ndarray]:
    return {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}


def restore_optimizer(optimizer: Any, model: Any, state: dict[str, np.ndarray]) -> None:
    """Put saved slot variables (Adam moments) and the step count back; the optimizer must be
    built for the same trainable variables in the same order."""
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    variables = optimizer.variables
    if len(variables) != len(state):
        raise ConfigError(f"checkpoint has {len(state)} optimizer variables, this model needs "
                          f"{len(variables)}: resume with the same --arch and --mode")
    for i, var in enumerate(variables):
        saved = state[f"v{i}"]
        if tuple(var.shape) != tuple(saved.shape):
            raise ConfigError(f"optimizer variable {i} has shape {tuple(saved.shape)} in the "
                              f"checkpoint, {tuple(var.shape)} here: resume with the same model")
        var.assign(saved)


def feature_key(arch: str, input_size: int, channels: int, weights_identity: str, seed: int,
                keras_version: str) -> tuple[str, dict[str, Any]]:
    """Name of a feature cache: ``<arch>-<12 hex>`` over everything that changes the features.

    The seed only matters for random (``none``) weights; the Keras version is in because the
    same seed may initialise differently in another release.
    """
    covers = {"arch": arch, "input_size": input_size, "channels": channels,
              "weights": weights_identity, "keras": keras_version, "format": FEATURES_FORMAT}
    if weights_identity == "none":
        covers["seed"] = seed
    digest = hashlib.sha256(json.dumps(covers, sort_keys=True).encode()).hexdigest()[:12]
    return f"{arch}-{digest}", covers


def progress_line(epoch: int, epochs: int, step: int, steps: int, images_per_s: float,
                  loss: float) -> str:
    return (f"epoch {epoch}/{epochs} step {step}/{steps}: loss {loss:.4f}, "
            f"{images_per_s:.0f} images/s")


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    per_label = ", ".join(f"{k} {_fmt(v)}" for k, v in (record.get("val_auroc") or {}).items())
    return (f"epoch {record['epoch']}/{epochs} done: loss {_fmt(record['loss'])}, val loss "
            f"{_fmt(record.get('val_loss'))}, val mean AUROC {_fmt(record.get('val_mean_auroc'))}"
            f" ({per_label}), {record['images_per_s']:.0f} images/s, {record['seconds']:.1f}s")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4f}"
