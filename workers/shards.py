"""The shapes of lake tables: image shards, error rows and predictions. Pure pyarrow/numpy."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from medray.workers.attributes import fields
from medray.workers.errors import ImageError

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        # null = ground truth unknown; [] = known to have no positive label
        pa.field("labels", pa.list_(pa.string())),
        pa.field("patient_key", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("channels", pa.int32(), nullable=False),
        pa.field("pixels", pa.binary(), nullable=False),
        pa.field("orig_height", pa.int32()),
        pa.field("orig_width", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("original", pa.binary()),
    ]
)



def shard_schema(attributes: Sequence[tuple[str, str]] = ()) -> pa.Schema:
    """SHARD_SCHEMA plus a version's typed patient attribute columns, (name, kind) as
    ``workers.attributes`` types them: every shard of a version has the same columns."""
    schema = SHARD_SCHEMA
    for f in fields(attributes):
        if f.name in SHARD_SCHEMA.names:
            raise ValueError(f"attribute column {f.name!r} would shadow a shard column")
        schema = schema.append(f)
    return schema


ERROR_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("error_type", pa.string()),
        pa.field("message", pa.string()),
        pa.field("stage", pa.string()),
        pa.field("at", pa.timestamp("us", tz="UTC")),
    ]
)

SPLITS = ("train", "val", "test")
_NOHASH = re.compile(r"_nohash_.*$")


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_utc() -> datetime:
    return datetime.now(UTC)


def split_for(key: str, val_percent: float, test_percent: float) -> str:
    """Deterministic split from a patient key: every image of a patient lands in one split.

    Same idea as TensorFlow's retrain.py (hash of the name into percentage buckets), with
    SHA-256 so it does not change between Python versions.
    """
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10_000 / 100.0
    if bucket < val_percent:
        return "val"
    if bucket < val_percent + test_percent:
        return "test"
    return "train"


def nohash_key(file_name: str) -> str:
    """retrain.py's rule: 'name_nohash_3.jpg' groups with 'name_nohash_1.jpg' (same subject)."""
    stem = file_name.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
    return _NOHASH.sub("", stem)


def shard_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in rows] for f in SHARD_SCHEMA}
    return pa.Table.from_pydict(cols, schema=SHARD_SCHEMA)


def error_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    rows = list(rows)
    cols = {f.name: [r.get(f.name) for r in rows] for f in ERROR_SCHEMA}
    cols["at"] = [r.get("at") or now_utc() for r in rows]
    return pa.Table.from_pydict(cols, schema=ERROR_SCHEMA)


def decode_pixels(blob: bytes, height: int, width: int, channels: int) -> np.ndarray:
    expected = height * width * channels
    if blob is None or len(blob) != expected:
        got = 0 if blob is None else len(blob)
        raise ImageError(
            f"pixel buffer has {got} bytes, expected {height}x{width}x{channels}={expected}",
            "bad_pixels",
        )
    return np.frombuffer(blob, dtype=np.uint8).reshape(height, width, channels)


def labels_to_targets(
    labels: Sequence[Sequence[str] | None], label_names: Sequence[str], multi_label: bool
) -> np.ndarray:
    """Ground truth as a float matrix (n, n_labels): one-hot for single-label, k-hot for multi."""
    index = {name: i for i, name in enumerate(label_names)}
    out = np.zeros((len(labels), len(label_names)), dtype=np.float32)
    for row, names in enumerate(labels):
        for name in names or ():
            if name in index:
                out[row, index[name]] = 1.0
    if not multi_label and len(labels) and np.any(out.sum(axis=1) != 1):
        raise ImageError("single-label dataset has a row without exactly one label", "bad_labels")
    return out


def metadata_json(meta: dict[str, Any] | None) -> str | None:
    return json.dumps(meta, sort_keys=True) if meta else None


def parse_max_errors(value: str, total: int) -> int:
    """'25' -> 25 errors allowed; '5%' -> 5% of ``total`` (rounded down)."""
    text = str(value).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError(pct)
            return int(total * pct / 100.0)
        count = int(text)
        if count < 0:
            raise ValueError(count)
        return count
    except ValueError:
        raise ValueError(
            f"--max-errors {value!r}: give a count (e.g. 25) or a percent (e.g. 5%)"
        ) from None
