"""The scorer: a plain class that loads a model once and turns a batch of shard rows into
the same number of prediction rows. Ray wraps it in an actor pool elsewhere.

A model card with a calibration (temperature scaling, with a bias in the forms that have one,
fitted at training) makes ``score_<label>`` the calibrated probability, the scale the card's
thresholds were chosen on; the model's own output stays beside it as ``raw_score_<label>``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.workers import calibration
from medray.workers.errors import ImageError
from medray.workers.models import ModelCard, configure_tensorflow, load_model
from medray.workers.shards import decode_pixels

log = logging.getLogger(__name__)
INPUT_COLUMNS = ["image_id", "source_uri", "labels", "height", "width", "channels", "pixels"]
# the last layer keeps float32 under mixed precision: a float16 softmax/sigmoid loses scores
_KEEP_FLOAT32 = ("scores",)


def score_column(label: str) -> str:
    return f"score_{label}"


def raw_score_column(label: str) -> str:
    """The uncalibrated score of a calibrated model (the model's own probability)."""
    return f"raw_score_{label}"


def prediction_schema(labels: list[str]) -> pa.Schema:
    return pa.schema(
        [
            pa.field("image_id", pa.string()),
            pa.field("source_uri", pa.string()),
            pa.field("true_labels", pa.list_(pa.string())),
            *[pa.field(score_column(label), pa.float32()) for label in labels],
            pa.field("predicted_labels", pa.list_(pa.string())),
            pa.field("error", pa.string()),
        ]
    )


def compiled_predict(model: Any, shape: tuple[int, int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """The model as one traced TensorFlow function taking uint8 pixels.

    Calling a Keras 3 model eagerly runs op by op (several times slower on CPU); the cast to
    float happens inside the graph, so a GPU receives uint8 (a quarter of the bytes).
    """
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, *shape), tf.uint8)], reduce_retracing=True)
    def predict(x: Any) -> Any:
        return tf.cast(model(tf.cast(x, tf.float32), training=False), tf.float32)

    def call(x: np.ndarray) -> np.ndarray:
        return np.asarray(predict(x).numpy(), dtype=np.float32)

    return call


def apply_mixed_precision(model: Any) -> Any:
    """A copy of a loaded model computing in float16 (weights stay float32).

    A .keras file records each layer's dtype policy, so setting Keras's global policy before
    loading changes nothing; the layers are rebuilt from their config with the new policy.
    """
    def rewrite(node: Any, keep: bool) -> Any:
        if isinstance(node, dict):
            name = node.get("config", {}).get("name") if isinstance(node.get("config"), dict) \
                else None
            keep_here = keep or name in _KEEP_FLOAT32
            out = {}
            for key, value in node.items():
                if key == "dtype" and isinstance(value, dict) and \
                        value.get("class_name") == "DTypePolicy" and not keep_here:
                    out[key] = {**value, "config": {**value["config"], "name": "mixed_float16"}}
                else:
                    out[key] = rewrite(value, keep_here)
            return out
        if isinstance(node, list):
            return [rewrite(v, keep) for v in node]
        return node

    config = rewrite(model.get_config(), False)
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def decode_batch(table: pa.Table, shape: tuple[int, int, int]) -> tuple[np.ndarray,
                                                                           list[str | None]]:
    """(n, H, W, C) uint8 pixels and one error (or None) per row.

    Shards hold fixed-size rows, so the usual batch is one contiguous run of bytes in the
    Arrow buffer and becomes the pixel array without a copy; rows of the wrong size are
    zero-filled and get an error, the others are still used.
    """
    n = table.num_rows
    size = int(np.prod(shape))
    dims = [pc.fill_null(table.column(c), 0).to_numpy() for c in ("height", "width", "channels")]
    shape_ok = (dims[0] == shape[0]) & (dims[1] == shape[1]) & (dims[2] == shape[2])
    pixels = table.column("pixels").combine_chunks() if n else pa.array([], pa.binary())
    if isinstance(pixels, pa.ChunkedArray):  # a zero-chunk column
        pixels = pa.array([], pa.binary())
    offset_type = np.int64 if pa.types.is_large_binary(pixels.type) else np.int32
    validity, offsets_buf, data_buf = pixels.buffers()[:3]
    offsets = np.frombuffer(offsets_buf, dtype=offset_type, count=n + 1,
                            offset=pixels.offset * np.dtype(offset_type).itemsize) \
        if offsets_buf is not None and n else np.zeros(n + 1, dtype=offset_type)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None \
        else np.zeros(0, dtype=np.uint8)
    lengths = np.diff(offsets)
    valid = pixels.is_valid().to_numpy(zero_copy_only=False) if validity is not None \
        else np.ones(n, dtype=bool)
    ok = shape_ok & valid & (lengths == size)
    errors: list[str | None] = [None] * n
    if n and ok.all() and offsets[-1] - offsets[0] == n * size:
        start = int(offsets[0])
        x = data[start : start + n * size].reshape(n, *shape)
        return x, errors
    x = np.zeros((n, *shape), dtype=np.uint8)
    for i in range(n):
        if ok[i]:
            x[i] = data[offsets[i] : offsets[i + 1]].reshape(shape)
            continue
        try:
            if not shape_ok[i]:
                raise ImageError(
                    f"image is {dims[0][i]}x{dims[1][i]}x{dims[2][i]}, model wants "
                    f"{shape[0]}x{shape[1]}x{shape[2]}",
                    "shape_mismatch",
                )
            blob = pixels[i].as_py()
            decode_pixels(blob, *shape)  # raises with the byte counts in its message
            raise ImageError("pixel buffer is unreadable", "bad_pixels")
        except ImageError as exc:
            errors[i] = f"{exc.kind}: {exc.message}"
    return x, errors


class Scorer:
    """Callable on a pyarrow table of shard rows; adds score columns, never drops a row.

    Rows that cannot be scored (bad pixels, a shape the model rejects) keep null scores and an
    ``error`` message; the rest of the batch is still scored.
    """

    def __init__(
        self,
        model_path: str,
        card: dict[str, Any],
        predict_batch: int = 256,
        mixed_precision: bool = False,
        threads: int | None = None,
    ) -> None:
        configure_tensorflow(False)
        import tensorflow as tf

        if threads:
            # TensorFlow sizes its pools to every core of the node; an actor given N CPUs by
            # Ray keeps to N so several actors on one node do not fight over cores
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))
            except RuntimeError:  # TensorFlow already started in this process
                log.warning("TensorFlow is already running: cannot limit it to %d threads",
                            threads)

        self.card = ModelCard.from_dict(card)
        self.labels = list(self.card.labels)
        self.predict_batch = predict_batch
        self.schema = prediction_schema(self.labels)
        self.shape = (self.card.input_size, self.card.input_size, self.card.channels)
        self.gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
        self.model = load_model(model_path)
        self.precision = "float32"
        if mixed_precision and self.gpus:
            self.model = apply_mixed_precision(self.model)
            self.precision = "mixed_float16"
        elif mixed_precision:
            # float16 has no fast kernels on CPUs: it would only be slower and less exact
            log.warning("mixed precision asked for but no GPU is visible: scoring in float32")
        self._predict = compiled_predict(self.model, self.shape)
        self._predict(np.zeros((1, *self.shape), dtype=np.uint8))  # trace once, before timing
        self.temperatures = calibration.temperatures(self.card.calibration, self.labels)
        self.biases = calibration.biases(self.card.calibration, self.labels)

    def calibrated(self, raw: np.ndarray) -> np.ndarray:
        """The card's calibration (temperatures, and biases where it has them) applied to raw
        model scores (as is without one)."""
        if self.temperatures is None:
            return raw
        return calibration.apply(raw, self.temperatures, self.card.multi_label, self.biases)

    def _scores(self, x: np.ndarray, ok: np.ndarray, errors: list[str | None]) -> np.ndarray:
        scores = np.full((len(x), len(self.labels)), np.nan, dtype=np.float32)
        idx = np.flatnonzero(ok)
        whole = len(idx) == len(x)
        for start in range(0, len(idx), self.predict_batch):
            chunk = idx[start : start + self.predict_batch]
            # a contiguous slice avoids a gather copy of the pixels in the usual all-good case
            batch = x[start : start + len(chunk)] if whole else x[chunk]
            try:
                scores[chunk] = self._predict(batch)
            except Exception as exc:  # isolate the row the model rejects, keep the others
                log.warning("batch of %d rejected (%s); scoring row by row", len(chunk), exc)
                for i in chunk:
                    try:
                        scores[i] = self._predict(x[i : i + 1])[0]
                    except Exception as row_exc:  # noqa: BLE001 - recorded per image
                        errors[i] = f"model_error: {type(row_exc).__name__}: {row_exc}"
        bad = ~np.isfinite(scores).all(axis=1)
        for i in np.flatnonzero(bad & ok):
            if errors[i] is None:
                errors[i] = "model_error: non-finite score"
        return scores

    def predicted(self, scores: np.ndarray) -> list[list[str] | None]:
        """Labels over their card threshold (multi-label) or the top label (single-label)."""
        out: list[list[str] | None] = []
        thresholds = np.array([self.card.threshold(lab) for lab in self.labels])
        finite = np.isfinite(scores).all(axis=1)
        top = np.argmax(np.nan_to_num(scores, nan=-np.inf), axis=1) if len(scores) else []
        above = scores >= thresholds
        for i in range(len(scores)):
            if not finite[i]:
                out.append(None)
            elif self.card.multi_label:
                out.append([lab for lab, hit in zip(self.labels, above[i], strict=True) if hit])
            else:
                out.append([self.labels[int(top[i])]])
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        x, errors = decode_batch(table, self.shape)
        ok = np.array([e is None for e in errors], dtype=bool)
        raw = self._scores(x, ok, errors)
        ok = np.array([e is None for e in errors], dtype=bool)
        raw[~ok] = np.nan
        scores = self.calibrated(raw)
        columns: dict[str, Any] = {
            "image_id": table.column("image_id"),
            "source_uri": table.column("source_uri"),
            "true_labels": table.column("labels"),
        }
        for j, label in enumerate(self.labels):
            columns[score_column(label)] = pa.array(scores[:, j], type=pa.float32(), mask=~ok)
        columns["predicted_labels"] = pa.array(self.predicted(scores), type=pa.list_(pa.string()))
        columns["error"] = pa.array(errors, type=pa.string())
        out = pa.table(columns, schema=self.schema)
        if self.temperatures is not None:
            for j, label in enumerate(self.labels):
                out = out.append_column(pa.field(raw_score_column(label), pa.float32()),
                                        pa.array(raw[:, j], type=pa.float32(), mask=~ok))
        for extra in table.column_names:  # pass-through bookkeeping columns such as _shard
            if extra.startswith("_"):
                out = out.append_column(extra, table.column(extra))
        return out
