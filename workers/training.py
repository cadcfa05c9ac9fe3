"""Pure TensorFlow training pieces: losses with class weights, the distributed train step,
evaluation, and optimizer state for exact resume. No Ray, no storage."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from medray.workers import metrics


def class_weights(counts: dict[str, int], labels: Sequence[str], total: int,
                  multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) weight per label.

    Multi-label uses CheXNet's weighted binary cross-entropy: w+ = N-/N, w- = N+/N.
    Single-label uses inverse class frequency (weight n / (k * n_c)) on the positive term.
    """
    pos = np.array([max(1, counts.get(lab, 0)) for lab in labels], dtype=np.float32)
    if multi_label:
        neg = np.maximum(1.0, total - pos)
        return (neg / total).astype(np.float32), (pos / total).astype(np.float32)
    w = total / (len(labels) * pos)
    return w.astype(np.float32), np.ones_like(w)


def make_loss(multi_label: bool, pos_w: np.ndarray | None, neg_w: np.ndarray | None) -> Any:
    """Per-example loss (shape [batch]); the caller averages over the global batch."""
    import tensorflow as tf

    eps = 1e-7
    pw = tf.constant(pos_w if pos_w is not None else 1.0, tf.float32)
    nw = tf.constant(neg_w if neg_w is not None else 1.0, tf.float32)

    def loss(y_true: Any, y_pred: Any) -> Any:
        y_pred = tf.clip_by_value(tf.cast(y_pred, tf.float32), eps, 1 - eps)
        if multi_label:
            terms = -(pw * y_true * tf.math.log(y_pred) + nw * (1 - y_true) * tf.math.log(1 - y_pred))
            return tf.reduce_mean(terms, axis=-1)
        return -tf.reduce_sum(pw * y_true * tf.math.log(y_pred), axis=-1)

    return loss


def make_train_step(strategy: Any, model: Any, optimizer: Any, loss_fn: Any,
                    global_batch: int) -> Any:
    """A distributed step: strategy.run + strategy.reduce, avoiding Keras 3 model.fit under
    MultiWorkerMirroredStrategy (ray-project/ray#47464)."""
    import tensorflow as tf

    def step_fn(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            pred = model(tf.cast(x, tf.float32), training=True)
            per_example = loss_fn(y, pred)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def train_step(x: Any, y: Any) -> Any:
        per_replica = strategy.run(step_fn, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    return train_step


def predict(model: Any, batches: Iterable[np.ndarray]) -> np.ndarray:
    outs = [np.asarray(model(x.astype(np.float32), training=False)) for x in batches]
    return np.concatenate(outs) if outs else np.zeros((0, model.output_shape[-1]), np.float32)


def evaluate(y: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Per-label AUROC and the mean over labels that have both classes."""
    per_label = {}
    for j, lab in enumerate(labels):
        per_label[lab] = metrics.auroc(y[:, j], scores[:, j]) if len(y) else float("nan")
    finite = [v for v in per_label.values() if np.isfinite(v)]
    return {"auroc": per_label, "mean_auroc": float(np.mean(finite)) if finite else float("nan")}


def choose_thresholds(y: np.ndarray, scores: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """Operating threshold per label on validation data (Youden's J)."""
    out = {}
    for j, lab in enumerate(labels):
        if len(y) and 0 < y[:, j].sum() < len(y):
            out[lab] = float(metrics.best_threshold(y[:, j], scores[:, j], method="youden"))
        else:
            out[lab] = 0.5
    return out


def optimizer_state(optimizer: Any) -> dict[str, np.ndarray]:
    return {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}


def restore_optimizer(optimizer: Any, model: Any, state: dict[str, np.ndarray]) -> None:
    optimizer.build(model.trainable_variables)
    variables = optimizer.variables
    if len(variables) != len(state):
        raise ValueError(f"checkpoint has {len(state)} optimizer variables, model needs "
                         f"{len(variables)}")
    for i, var in enumerate(variables):
        var.assign(state[f"v{i}"])
