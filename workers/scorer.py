"""The scorer: a plain class that loads a model once and turns a batch of shard rows into
the same number of prediction rows. Ray wraps it in an actor pool elsewhere."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from medray.workers.errors import ImageError
from medray.workers.models import ModelCard, configure_tensorflow, load_model
from medray.workers.shards import decode_pixels

log = logging.getLogger(__name__)
INPUT_COLUMNS = ["image_id", "source_uri", "labels", "height", "width", "channels", "pixels"]


def score_column(label: str) -> str:
    return f"score_{label}"


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
    ) -> None:
        configure_tensorflow(mixed_precision)
        self.card = ModelCard.from_dict(card)
        self.model = load_model(model_path)
        self.labels = list(self.card.labels)
        self.predict_batch = predict_batch
        self.schema = prediction_schema(self.labels)
        shape = (self.card.input_size, self.card.input_size, self.card.channels)
        self._predict(np.zeros((1, *shape), dtype=np.uint8))  # build the graph before timing starts

    def _predict(self, x: np.ndarray) -> np.ndarray:
        out = self.model(x.astype(np.float32), training=False)
        return np.asarray(out, dtype=np.float32)

    def _decode(self, table: pa.Table) -> tuple[np.ndarray, list[str | None]]:
        expected = (self.card.input_size, self.card.input_size, self.card.channels)
        n = table.num_rows
        x = np.zeros((n, *expected), dtype=np.uint8)
        errors: list[str | None] = [None] * n
        cols = {c: table.column(c).to_pylist() for c in ("height", "width", "channels")}
        blobs = table.column("pixels")
        for i in range(n):
            try:
                shape = (cols["height"][i], cols["width"][i], cols["channels"][i])
                if tuple(shape) != expected:
                    raise ImageError(
                        f"image is {shape[0]}x{shape[1]}x{shape[2]}, model wants "
                        f"{expected[0]}x{expected[1]}x{expected[2]}",
                        "shape_mismatch",
                    )
                x[i] = decode_pixels(blobs[i].as_py(), *shape)
            except ImageError as exc:
                errors[i] = f"{exc.kind}: {exc.message}"
        return x, errors

    def _scores(self, x: np.ndarray, ok: np.ndarray, errors: list[str | None]) -> np.ndarray:
        scores = np.full((len(x), len(self.labels)), np.nan, dtype=np.float32)
        idx = np.flatnonzero(ok)
        for start in range(0, len(idx), self.predict_batch):
            chunk = idx[start : start + self.predict_batch]
            try:
                scores[chunk] = self._predict(x[chunk])
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
        out: list[list[str] | None] = []
        thresholds = np.array([self.card.threshold(lab) for lab in self.labels])
        for row in scores:
            if not np.isfinite(row).all():
                out.append(None)
            elif self.card.multi_label:
                out.append([lab for lab, s, t in zip(self.labels, row, thresholds, strict=True)
                            if s >= t])
            else:
                out.append([self.labels[int(np.argmax(row))]])
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        x, errors = self._decode(table)
        ok = np.array([e is None for e in errors], dtype=bool)
        scores = self._scores(x, ok, errors)
        ok = np.array([e is None for e in errors], dtype=bool)
        scores[~ok] = np.nan
        columns: dict[str, Any] = {
            "image_id": table.column("image_id"),
            "source_uri": table.column("source_uri"),
            "true_labels": table.column("labels"),
        }
        for j, label in enumerate(self.labels):
            columns[score_column(label)] = pa.array(scores[:, j], type=pa.float32(),
                                                    mask=~ok)
        columns["predicted_labels"] = pa.array(self.predicted(scores), type=pa.list_(pa.string()))
        columns["error"] = pa.array(errors, type=pa.string())
        out = pa.table(columns, schema=self.schema)
        for extra in table.column_names:  # pass-through bookkeeping columns such as _shard
            if extra.startswith("_"):
                out = out.append_column(extra, table.column(extra))
        return out
