"""Listing staging sources into work items, and reading + decoding one batch of items.

An item is a dict: {"kind": "file"|"npz", "uri", "labels", "split", "patient_key", ...}.
Listing runs on the job driver; decoding runs in parallel Ray tasks (``decode_batch``).
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from medray.cluster.home import deid_salt
from medray.cluster.lake import source_filesystem, source_uri
from medray.workers.deid import Deidentifier, deidentify_bytes
from medray.workers.errors import ConfigError, ImageError, InputError
from medray.workers.imaging import array_to_pixels, decode_image
from medray.workers.shards import SHARD_SCHEMA, image_id, metadata_json, nohash_key

log = logging.getLogger(__name__)
SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
IMAGE_EXT = {".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ""}
OUT_SCHEMA = SHARD_SCHEMA.append(pa.field("_error_type", pa.string())).append(
    pa.field("_error_message", pa.string())
)
NPZ_CHUNK = 512


def detect_format(source: str) -> str:
    lower = source.lower()
    if lower.endswith(".npz"):
        return "npz"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith((".dcm", ".dicom")):
        return "dicom"
    fs, path = source_filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"source not found: {source}")
    if info.type == pafs.FileType.File:
        raise ConfigError(f"cannot tell the format of {source}: pass --format")
    return "folder"


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


def list_folder(source: str, fmt: str) -> list[dict[str, Any]]:
    """root/<label>/* or root/<split>/<label>/*; with --format dicom any tree of files."""
    fs, root = source_filesystem(source)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
    items = []
    for path in files:
        rel = path[len(root) :].lstrip("/")
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts):
            continue
        ext = posixpath.splitext(parts[-1])[1].lower()
        if ext not in IMAGE_EXT and fmt != "dicom":
            continue
        split = SPLIT_DIRS.get(parts[0].lower()) if len(parts) > 2 else None
        label_parts = parts[1:-1] if split else parts[:-1]
        label = label_parts[0] if label_parts else None
        item: dict[str, Any] = {
            "kind": "file",
            "uri": source_uri(fs, path),
            "labels": [label] if label else None,
            "split": split,
            # retrain.py's grouping: files named x_nohash_N share a subject
            "patient_key": f"name:{label}/{nohash_key(parts[-1])}",
        }
        if fmt != "dicom" and label is None:
            item["error"] = ("no_label", "file is not inside a <label>/ folder")
        items.append(item)
    if not items:
        raise ConfigError(f"no image files under {source}")
    return items


def list_npz(source: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    fs, path = source_filesystem(source)
    arrays = _load_npz(source)
    items = []
    splits = [k[: -len("_images")] for k in arrays if k.endswith("_images")]
    if not splits:
        raise ConfigError(f"{source} has no '<split>_images' arrays (MedMNIST layout)")
    n_labels = None
    for split in sorted(splits):
        images = arrays[f"{split}_images"]
        labels = arrays.get(f"{split}_labels")
        if labels is not None and len(labels) != len(images):
            raise ConfigError(f"{source}: {split}_labels has {len(labels)} rows, images {len(images)}")
        if labels is not None:
            width = 1 if labels.ndim == 1 else labels.shape[1]
            n_labels = width if n_labels is None else n_labels
        for start in range(0, len(images), NPZ_CHUNK):
            items.append(
                {
                    "kind": "npz",
                    "uri": source_uri(fs, path),
                    "split": SPLIT_DIRS.get(split, split),
                    "array": split,
                    "start": start,
                    "stop": min(start + NPZ_CHUNK, len(images)),
                }
            )
    return items, {"label_width": n_labels}


@functools.lru_cache(maxsize=2)
def _load_npz(source: str) -> dict[str, np.ndarray]:
    fs, path = source_filesystem(source)
    try:
        with np.load(io.BytesIO(_read_all(fs, path)), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as exc:
        raise ConfigError(f"cannot read {source} as .npz: {exc}") from exc


def npz_label_names(source: str, names: list[str] | None) -> tuple[list[str], bool]:
    """Label names and whether the npz is multi-label (k-hot label columns)."""
    arrays = _load_npz(source)
    label_arrays = [v for k, v in arrays.items() if k.endswith("_labels")]
    if not label_arrays:
        return list(names or []), False
    first = label_arrays[0]
    multi = first.ndim == 2 and first.shape[1] > 1
    if multi:
        count = first.shape[1]
    else:
        count = int(max(int(np.max(a)) for a in label_arrays if a.size) + 1)
    if names:
        if len(names) != count:
            raise ConfigError(f"--label-names gives {len(names)} names; the npz has {count} classes")
        return list(names), multi
    return [str(i) for i in range(count)], multi


def list_csv(
    source: str,
    path_column: str,
    label_column: str,
    label_sep: str,
    no_finding: str,
    patient_column: str | None,
    images_root: str | None,
) -> list[dict[str, Any]]:
    """A CSV/TSV manifest (ChestX-ray14's Data_Entry_2017.csv by default). Paths resolve
    under --images-root (default: the manifest's folder) and may not leave it."""
    fs, path = source_filesystem(source)
    text = _read_all(fs, path).decode("utf-8-sig")
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = reader.fieldnames or []
    for needed in (path_column, label_column):
        if needed not in columns:
            raise ConfigError(f"{source} has no column {needed!r} (columns: {columns})")
    if patient_column and patient_column not in columns:
        raise ConfigError(f"{source} has no patient column {patient_column!r}")
    root_fs, root = source_filesystem(images_root) if images_root else (fs, posixpath.dirname(path))
    items = []
    for line_no, row in enumerate(reader, start=2):
        rel = (row.get(path_column) or "").strip()
        raw_labels = (row.get(label_column) or "").strip()
        labels = sorted({x.strip() for x in raw_labels.split(label_sep) if x.strip()} - {no_finding})
        item: dict[str, Any] = {"kind": "file", "labels": labels, "split": None, "line": line_no}
        resolved = posixpath.normpath(posixpath.join(root, rel)) if rel else ""
        if not rel or rel.startswith("/") or not resolved.startswith(root.rstrip("/") + "/"):
            item["uri"] = rel or f"{source}#line{line_no}"
            item["error"] = ("unsafe_path", f"line {line_no}: path {rel!r} is empty or leaves "
                             "the images root")
        else:
            item["uri"] = source_uri(root_fs, resolved)
        if patient_column and row.get(patient_column):
            item["patient_key"] = "csv:" + row[patient_column].strip()
        else:
            item["patient_key"] = f"name:{nohash_key(rel)}"
        items.append(item)
    if not items:
        raise ConfigError(f"{source} lists no images")
    return items


def all_labels(items: list[dict[str, Any]]) -> list[str]:
    return sorted({lab for it in items for lab in (it.get("labels") or [])})


class BatchDecoder:
    """Reads and decodes one batch of items into shard rows (or error rows). Runs in Ray tasks."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.size = int(options["image_size"])
        self.channels = int(options["channels"])
        self.keep_original = bool(options["keep_original"])
        self.max_pixels = int(options["max_pixels"])
        self.label_names: list[str] = options.get("label_names") or []
        self.multi_label = bool(options.get("multi_label"))
        self.deid = Deidentifier(deid_salt())

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows: list[dict[str, Any]] = []
        for raw in batch["item"]:
            item = dict(raw)
            if item["kind"] == "npz":
                rows.extend(self._npz_rows(item))
            else:
                rows.append(self._file_row(item))
        cols = {f.name: [r.get(f.name) for r in rows] for f in OUT_SCHEMA}
        return pa.Table.from_pydict(cols, schema=OUT_SCHEMA)

    def _error(self, item: dict[str, Any], kind: str, message: str, data_id: str | None = None
               ) -> dict[str, Any]:
        return {"source_uri": item["uri"], "image_id": data_id or "", "split": "", "height": 0,
                "width": 0, "channels": 0, "pixels": b"", "_error_type": kind,
                "_error_message": message}

    def _file_row(self, item: dict[str, Any]) -> dict[str, Any]:
        if item.get("error"):
            return self._error(item, *item["error"])
        try:
            fs, path = source_filesystem(item["uri"])
            data = _read_all(fs, path)
        except (OSError, InputError) as exc:
            return self._error(item, "unreadable", f"{type(exc).__name__}: {exc}")
        digest = image_id(data)
        try:
            img = decode_image(data, size=self.size, channels=self.channels,
                               name=item["uri"], max_pixels=self.max_pixels)
        except ImageError as exc:
            return self._error(item, exc.kind, exc.message, digest)
        patient_key = item.get("patient_key")
        if img.patient_ref:  # DICOM: the raw ID is hashed here and never stored
            patient_key = "dicom:" + img.patient_ref
        original = None
        if self.keep_original:
            original = deidentify_bytes(data, self.deid)[0] if img.format == "dicom" else data
        return self._row(item, digest, img.pixels, img.original_height, img.original_width,
                         img.format, img.metadata, patient_key, original)

    def _row(self, item: dict[str, Any], digest: str, pixels: np.ndarray, oh: int, ow: int,
             fmt: str, meta: dict[str, Any] | None, patient_key: str | None,
             original: bytes | None) -> dict[str, Any]:
        return {
            "image_id": digest,
            "source_uri": item["uri"],
            "labels": item.get("labels"),
            "patient_key": self.deid.patient_key(patient_key) if patient_key else None,
            "split": item.get("split") or "",
            "height": self.size,
            "width": self.size,
            "channels": self.channels,
            "pixels": pixels.tobytes(),
            "orig_height": oh,
            "orig_width": ow,
            "format": fmt,
            "metadata": metadata_json(meta),
            "original": original,
        }

    def _npz_rows(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        arrays = _load_npz(item["uri"])
        images = arrays[f"{item['array']}_images"]
        labels = arrays.get(f"{item['array']}_labels")
        out = []
        for i in range(item["start"], item["stop"]):
            sub = {**item, "uri": f"{item['uri']}#{item['array']}/{i}"}
            arr = images[i]
            digest = image_id(np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode())
            try:
                pixels = array_to_pixels(arr, size=self.size, channels=self.channels)
                sub["labels"] = self._npz_labels(labels[i]) if labels is not None else None
            except (ImageError, IndexError, ValueError) as exc:
                kind = exc.kind if isinstance(exc, ImageError) else "bad_label"
                out.append(self._error(sub, kind, str(exc), digest))
                continue
            shape = arr.shape
            out.append(self._row(sub, digest, pixels, int(shape[0]), int(shape[1]) if
                                 len(shape) > 1 else 1, "array", None, None,
                                 np.ascontiguousarray(arr).tobytes() if self.keep_original
                                 else None))
            out[-1]["patient_key"] = None  # MedMNIST has no patient ids; its splits are kept
        return out

    def _npz_labels(self, value: np.ndarray) -> list[str]:
        vec = np.atleast_1d(value)
        if not np.all(np.isfinite(vec.astype(np.float64))):
            raise ValueError("label is NaN")
        if self.multi_label:
            return [self.label_names[j] for j in np.flatnonzero(vec > 0)]
        return [self.label_names[int(vec[0])]]
