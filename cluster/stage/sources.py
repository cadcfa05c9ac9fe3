"""Staging sources: listing them into work items, and reading + decoding batches of items.

Listing runs on the job driver and produces a compact Arrow table of items (``ITEM_SCHEMA``);
folders are listed with one request stream per top-level folder, in parallel threads.
``BatchDecoder`` runs in a Ray Data actor pool: it reads the files of a batch concurrently
(I/O overlaps), decodes them one by one and returns shard rows or error rows (``OUT_SCHEMA``).
A .npz is streamed by ``read_npz_member`` tasks (one per array, bounded memory) into the same
item rows, with the array row inline.

Layouts (``--format auto`` picks one):
- folder: ``root/<label>/...`` as TensorFlow's retrain.py read it, or ``root/<split>/<label>/...``
  when every top-level folder is a split name; a flat folder stages with unknown labels.
- dicom: the same tree rules, any file name (DICOM files often have none); auto-detected when
  most files end in .dcm/.dicom. Labels come from folders only in the plain label/file shape,
  never from deeper trees (which are usually patient/study/series folders).
- csv/tsv: a manifest such as ChestX-ray14's Data_Entry_2017.csv; paths resolve under the images
  root and may not leave it; a bare file name is also looked up anywhere below the root.
- npz: MedMNIST's ``<split>_images`` / ``<split>_labels`` arrays (or plain ``images``).
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import io
import json
import logging
import math
import os
import posixpath
import re
import stat
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from medray.cluster.infra import faults
from medray.cluster.infra.home import deid_salt
from medray.cluster.store.lake import source_filesystem, source_uri
from medray.workers.deid import Deidentifier, deidentify_bytes
from medray.workers.errors import ConfigError, ImageError, InputError
from medray.workers.imaging import array_to_pixels, decode_image
from medray.workers.shards import SHARD_SCHEMA, image_id, metadata_json, nohash_key, split_for

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "train", "training": "train", "val": "val", "validation": "val",
              "valid": "val", "test": "test", "testing": "test"}
IMAGE_EXT = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".dcm", ".dicom", ".dic",
                       ".bmp", ".tif", ".tiff", ".gif", ".webp", ""})
DICOM_EXT = frozenset({".dcm", ".dicom", ".dic"})
# Files that sit beside images in real collections and are not images: skipped, counted.
SIDECAR_EXT = frozenset({".txt", ".csv", ".tsv", ".json", ".md", ".rst", ".xml", ".html",
                         ".htm", ".yaml", ".yml", ".ini", ".cfg", ".log", ".db", ".pdf"})
SKIP_NAMES = frozenset({"dicomdir", "readme", "license", "licence", "notice", "changelog",
                        "thumbs.db", "desktop.ini"})
CSV_DEFAULT_PATIENT_COLUMN = "Patient ID"
NPZ_CHUNK = 512
BLOCK_BYTES = 16 * 1024 * 1024
# object store budget of a staging job's pipeline: a few blocks per decoder in flight
STAGE_STORE_BYTES = 256 * 1024 * 1024
LIST_THREADS = 8
READ_THREADS = 8
_BASE_FILE_BYTES = 16 * 1024 * 1024
_BYTES_PER_PIXEL_BOUND = 6  # 3 samples x 16 bits: the largest common uncompressed pixel

ITEM_SCHEMA = pa.schema([
    pa.field("kind", pa.string()),            # "file" | "array"
    pa.field("uri", pa.string()),
    pa.field("size", pa.int64()),
    pa.field("labels", pa.list_(pa.string())),  # null = unknown, [] = no positive label
    pa.field("split", pa.string()),           # from the source; null = assign by patient
    pa.field("patient_key", pa.string()),     # raw grouping key ("name:...", "csv:..."), hashed
    pa.field("error_type", pa.string()),      # set when listing already knows it is bad
    pa.field("error_message", pa.string()),
    pa.field("data", pa.binary()),            # "array": the .npy row bytes
    pa.field("shape", pa.list_(pa.int64())),
    pa.field("dtype", pa.string()),
    pa.field("label_values", pa.list_(pa.float64())),
])
OUT_SCHEMA = (SHARD_SCHEMA
              .append(pa.field("_error_type", pa.string()))
              .append(pa.field("_error_message", pa.string()))
              .append(pa.field("_stage", pa.string()))
              .append(pa.field("_bytes", pa.int64()))
              .append(pa.field("_known", pa.bool_())))


def max_file_bytes(max_pixels: int) -> int:
    """Largest input file read into memory: an uncompressed image at the pixel limit."""
    return _BASE_FILE_BYTES + _BYTES_PER_PIXEL_BOUND * int(max_pixels)


@dataclass
class Listing:
    """What the driver hands to the decode stage."""

    format: str
    items: pa.Table                     # ITEM_SCHEMA; for npz, one row per array member
    inputs: int                         # images expected (files, or array rows)
    label_names: list[str]
    multi_label: bool
    has_splits: bool
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- format + listing
def detect_format(source: str) -> str:
    """npz, csv, dicom or folder, from the name and (for folders) later from the files."""
    lower = source.lower().rstrip("/")
    if lower.endswith(".npz"):
        return "npz"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith(tuple(DICOM_EXT)):
        return "dicom"
    fs, path = source_filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"source not found: {source}: give an existing folder, file or "
                          "s3://bucket/prefix")
    if info.type == pafs.FileType.File and posixpath.splitext(lower)[1] not in IMAGE_EXT:
        raise ConfigError(f"cannot tell the format of {source}: pass --format "
                          "folder|npz|csv|dicom")
    return "folder"


@dataclass
class _Entry:
    rel: str
    size: int | None
    error: tuple[str, str] | None = None


def _walk_local(root: str, top: str) -> Iterator[_Entry]:
    """Files below ``top`` without following symlinked folders (a link to an ancestor would
    loop); sockets, FIFOs and devices are left out (reading a FIFO blocks forever)."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            yield _Entry(os.path.relpath(folder, root), None,
                         ("unreadable", f"cannot list folder: {type(exc).__name__}: {exc}"))
            continue
        for entry in entries:
            rel = os.path.relpath(entry.path, root).replace(os.sep, "/")
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not _hidden(entry.name):  # never walk into .git and the like
                        stack.append(entry.path)
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError as exc:  # a dangling link or a file that vanished
                yield _Entry(rel, None, ("unreadable", f"{type(exc).__name__}: {exc}"))
                continue
            if stat.S_ISREG(st.st_mode):
                yield _Entry(rel, st.st_size)


def _list_tree(source: str) -> tuple[pafs.FileSystem, str, list[_Entry]]:
    """(fs, root path, entries) for a folder or one file; top-level folders in parallel."""
    fs, root = source_filesystem(source)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"source not found: {source}")
    if info.type == pafs.FileType.File:
        parent, name = posixpath.split(root)
        return fs, parent, [_Entry(name, info.size)]
    local = isinstance(fs, pafs.LocalFileSystem)
    top = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    entries = [_Entry(i.base_name, i.size) for i in top if i.type == pafs.FileType.File]
    folders = [i.path for i in top
               if i.type == pafs.FileType.Directory and not _hidden(i.base_name)]

    def list_one(path: str) -> list[_Entry]:
        if local:
            return list(_walk_local(root, path))
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except OSError as exc:
            rel = path[len(root):].lstrip("/")
            return [_Entry(rel, None, ("unreadable", f"cannot list: {exc}"))]
        return [_Entry(i.path[len(root):].lstrip("/"), i.size) for i in infos
                if i.type == pafs.FileType.File]

    with ThreadPoolExecutor(LIST_THREADS) as pool:
        for part in pool.map(list_one, folders):
            entries.extend(part)
    entries.sort(key=lambda e: e.rel)
    return fs, root, entries


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _skip_reason(rel: str) -> str | None:
    parts = rel.split("/")
    if any(_hidden(p) for p in parts):
        return "hidden"
    name = parts[-1].lower()
    if name in SKIP_NAMES or posixpath.splitext(name)[0] in SKIP_NAMES:
        return "sidecar"
    if posixpath.splitext(name)[1] in SIDECAR_EXT:
        return "sidecar"
    return None


def folder_items(source: str, fmt: str = "auto",
                 label_names: list[str] | None = None) -> tuple[str, list[dict[str, Any]],
                                                              dict[str, Any]]:
    """Items of a folder tree (or a single image/DICOM file): (format, items, info)."""
    fs, root, entries = _list_tree(source)
    kept: list[_Entry] = []
    skipped: list[str] = []
    for e in entries:
        reason = _skip_reason(e.rel)
        if reason == "sidecar":
            skipped.append(e.rel)
        elif reason is None:
            kept.append(e)
    if fmt in ("auto", "folder"):
        exts = Counter(posixpath.splitext(e.rel)[1].lower() for e in kept if not e.error)
        dicom = sum(exts[x] for x in DICOM_EXT)
        fmt = "dicom" if fmt == "auto" and dicom and dicom * 2 >= sum(exts.values()) else "folder"
    parts_of = [e.rel.split("/") for e in kept]
    top_dirs = {p[0] for p in parts_of if len(p) > 1}
    has_splits = bool(top_dirs) and all(d.lower() in SPLIT_DIRS for d in top_dirs)
    depth = 2 if has_splits else 1  # path parts before the label folder name
    labelled = [len(p) > depth for p in parts_of]
    use_labels = any(labelled)
    if fmt == "dicom" and use_labels:
        # patient/study/series trees are not label folders (and their names may be PHI)
        use_labels = all(len(p) == depth + 1 for p, has in zip(parts_of, labelled, strict=True)
                         if has)
    known = set(label_names or [])
    items = []
    for e, parts in zip(kept, parts_of, strict=True):
        name = parts[-1]
        split = SPLIT_DIRS[parts[0].lower()] if has_splits and len(parts) > 1 else None
        label = parts[depth - 1] if use_labels and len(parts) > depth else None
        item: dict[str, Any] = {
            "kind": "file", "uri": source_uri(fs, f"{root}/{e.rel}"), "size": e.size,
            "labels": [label] if label is not None else None, "split": split,
            # retrain.py's rule: 'x_nohash_2.png' is the same subject as 'x_nohash_1.png'
            "patient_key": f"name:{nohash_key(name)}",
        }
        ext = posixpath.splitext(name)[1].lower()
        if e.error:
            item["error_type"], item["error_message"] = e.error
        elif fmt == "folder" and ext not in IMAGE_EXT:
            item["error_type"] = "unsupported"
            item["error_message"] = (f"extension {ext!r} is not an image format medray reads "
                                     "(JPEG, PNG, DICOM, BMP, TIFF, GIF, WebP)")
        elif use_labels and label is None:
            item["error_type"] = "no_label"
            item["error_message"] = ("the file is not inside a <label>/ folder while other "
                                     "files are: move it into one or remove it")
        elif known and label is not None and label not in known:
            item["error_type"] = "unknown_label"
            item["error_message"] = f"label {label!r} is not one of --label-names"
        items.append(item)
    if not items:
        raise ConfigError(f"no image files under {source} ({len(skipped)} other files skipped)")
    return fmt, items, {"has_splits": has_splits, "skipped": skipped}


# ---------------------------------------------------------------------------- CSV manifests
def parse_labels(raw: str | None, sep: str, no_finding: str | None) -> list[str] | None:
    """'Effusion|Mass' -> ['Effusion', 'Mass']; 'No Finding' -> []; empty -> None (unknown)."""
    text = (raw or "").strip()
    if not text:
        return None
    parts = {p.strip() for p in (text.split(sep) if sep else [text])} - {""}
    if no_finding:
        parts.discard(no_finding)
    return sorted(parts)


_DRIVE = re.compile(r"^[A-Za-z]:/")


def resolve_under(root: str, rel: str) -> str | None:
    """``root/rel`` normalised, or None when ``rel`` is absolute, a URI, or climbs out."""
    rel = rel.strip().replace("\\", "/")
    if not rel or rel.startswith("/") or _DRIVE.match(rel) or "://" in rel:
        return None
    base = root.rstrip("/")
    resolved = posixpath.normpath(posixpath.join(base, rel))
    return resolved if resolved.startswith(base + "/") else None


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def csv_items(source: str, path_column: str, label_column: str, label_sep: str,
              no_finding: str | None, patient_column: str | None,
              images_root: str | None = None,
              label_names: list[str] | None = None) -> list[dict[str, Any]]:
    """Items of a CSV/TSV manifest; rows whose path is unsafe or missing become error items."""
    fs, path = source_filesystem(source)
    try:
        with fs.open_input_stream(path) as fh:
            text = fh.read().decode("utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"manifest not found: {source}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not UTF-8 text: {exc}") from None
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    columns = list(reader.fieldnames or [])
    for flag, needed in (("--path-column", path_column), ("--label-column", label_column)):
        if needed not in columns:
            raise ConfigError(f"{source} has no column {needed!r}{_suggest(needed, columns)}: "
                              f"pass {flag} (columns: {columns})")
    if patient_column and patient_column not in columns:
        if patient_column != CSV_DEFAULT_PATIENT_COLUMN:
            raise ConfigError(f"{source} has no patient column {patient_column!r}"
                              f"{_suggest(patient_column, columns)} (columns: {columns})")
        log.warning("%s has no %r column: splits group images by file name instead", source,
                    patient_column)
        patient_column = None
    if images_root:
        root_fs, root, entries = _list_tree(images_root)
    else:
        root_fs, root = fs, posixpath.dirname(path)
        _, _, entries = _list_tree(source_uri(fs, root))
    sizes = {e.rel: e.size for e in entries if not e.error}
    by_name: dict[str, list[str]] | None = None
    known = set(label_names or [])
    items = []
    for line, row in enumerate(reader, start=2):
        rel = (row.get(path_column) or "").strip()
        labels = parse_labels(row.get(label_column), label_sep, no_finding)
        patient = (row.get(patient_column) or "").strip() if patient_column else ""
        item: dict[str, Any] = {
            "kind": "file", "labels": labels, "split": None,
            "patient_key": f"csv:{patient}" if patient else f"name:{nohash_key(rel)}",
        }
        base = root.rstrip("/")
        resolved = resolve_under(root, rel)
        if resolved is None:
            item["uri"] = f"{source}#line{line}"
            item["error_type"] = "unsafe_path"
            item["error_message"] = (f"line {line}: path {rel!r} is empty, absolute or leaves "
                                     "the images root: give paths relative to --images-root")
        else:
            wanted = resolved[len(base) + 1:]
            found: str | None = wanted if wanted in sizes else None
            if found is None and "/" not in wanted:
                if by_name is None:  # ChestX-ray14 ships images_001/images/... folders
                    by_name = {}
                    for key in sizes:
                        by_name.setdefault(posixpath.basename(key), []).append(key)
                matches = by_name.get(wanted, [])
                found = matches[0] if len(matches) == 1 else None
                if len(matches) > 1:
                    item["error_type"] = "ambiguous_path"
                    item["error_message"] = (f"line {line}: {rel!r} matches {len(matches)} "
                                             "files below the images root: give its path")
            item["uri"] = source_uri(root_fs, f"{base}/{found or wanted}")
            item["size"] = sizes.get(found) if found else None
            if found is None and "error_type" not in item:
                item["error_type"] = "missing"
                item["error_message"] = f"line {line}: {rel!r} is not under the images root"
        if known and labels and "error_type" not in item and set(labels) - known:
            item["error_type"] = "unknown_label"
            item["error_message"] = (f"line {line}: labels {sorted(set(labels) - known)} are "
                                     "not in --label-names")
        items.append(item)
    if not items:
        raise ConfigError(f"{source} lists no images")
    return items


# ---------------------------------------------------------------------------- .npz arrays
def _open_zip(uri: str) -> zipfile.ZipFile:
    fs, path = source_filesystem(uri)
    try:
        handle = fs.open_input_file(path)
        return zipfile.ZipFile(handle)
    except FileNotFoundError:
        raise ConfigError(f"source not found: {uri}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ConfigError(f"cannot read {uri} as .npz: {exc}") from None


def _npy_header(fh: Any, uri: str, name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ConfigError(f"{uri}: {name} uses .npy format {version}: re-save it with numpy")
    if dtype.hasobject:
        raise ConfigError(f"{uri}: {name} holds Python objects; only numeric arrays are read")
    return tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran)


def npz_members(uri: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of the arrays in a .npz, from their headers only."""
    out = {}
    with _open_zip(uri) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            name = info.filename[:-4]
            with zf.open(info) as fh:
                shape, dtype, _ = _npy_header(fh, uri, name)
            out[name] = (shape, dtype)
    return out


@contextlib.contextmanager
def local_npz(uri: str) -> Iterator[str]:
    """A local path for the npz: the file itself, or a streamed temporary copy of an S3 object
    (zipfile reads in 4 KB pieces, which would be one GET each)."""
    fs, path = source_filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    fd, copy = tempfile.mkstemp(suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            while block := src.read(8 << 20):
                out.write(block)
        yield copy
    finally:
        os.unlink(copy)


def iter_npz_rows(uri: str, name: str, chunk: int = NPZ_CHUNK
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows) chunks of one array, streamed: memory holds one chunk, not the array."""
    with _open_zip(uri) as zf, zf.open(f"{name}.npy") as fh:
        shape, dtype, fortran = _npy_header(fh, uri, name)
        if fortran and len(shape) > 1:
            raise ConfigError(f"{uri}: {name} is stored in Fortran order: re-save it C-ordered")
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], chunk):
            count = min(chunk, shape[0] - start)
            buf = fh.read(count * row)
            if len(buf) != count * row:
                raise ConfigError(f"{uri}: {name} is truncated: rows from {start} are missing")
            yield start, np.frombuffer(buf, dtype=dtype).reshape((count, *shape[1:]))


def npz_plan(uri: str, names: list[str] | None) -> tuple[list[dict[str, Any]], int, list[str],
                                                        bool, bool]:
    """(member items, rows, label names, multi-label, has splits) for a MedMNIST-style npz."""
    members = npz_members(uri)
    groups = sorted(k[: -len("_images")] for k in members if k.endswith("_images"))
    pairs = [(g, f"{g}_images", f"{g}_labels") for g in groups]
    if not pairs and "images" in members:
        pairs = [("", "images", "labels")]
    if not pairs:
        raise ConfigError(f"{uri} has no '<split>_images' arrays (MedMNIST layout); it has "
                          f"{sorted(members)}")
    items, total, widths, top = [], 0, set(), -1
    for group, images, labels in pairs:
        n = members[images][0][0]
        if labels in members:
            lshape = members[labels][0]
            if lshape[0] != n:
                raise ConfigError(f"{uri}: {labels} has {lshape[0]} rows, {images} has {n}")
            widths.add(1 if len(lshape) == 1 else int(np.prod(lshape[1:])))
            if len(lshape) == 1 or (len(lshape) == 2 and lshape[1] == 1):
                for _, chunk in iter_npz_rows(uri, labels, chunk=1 << 20):
                    finite = chunk[np.isfinite(chunk)] if chunk.dtype.kind == "f" else chunk
                    if finite.size:
                        top = max(top, int(finite.max()))
        items.append({"kind": "npz", "uri": uri, "array": images,
                      "labels_array": labels if labels in members else None,
                      "split": SPLIT_DIRS.get(group.lower()) if group else None, "rows": n})
        total += n
    if len(widths) > 1:
        raise ConfigError(f"{uri}: label arrays differ in width {sorted(widths)}")
    width = widths.pop() if widths else 0
    multi = width > 1
    count = width if multi else top + 1
    if names:
        if width and len(names) != count:
            raise ConfigError(f"--label-names gives {len(names)} names; {uri} has {count} "
                              "classes")
        label_names = list(names)
    else:
        label_names = [str(i) for i in range(max(count, 0))]
    has_splits = all(it["split"] for it in items)
    return items, total, label_names, multi, has_splits


def read_npz_member(batch: pa.Table) -> Iterator[pa.Table]:
    """Ray Data UDF: one member descriptor in, item tables of NPZ_CHUNK array rows out."""
    for member in batch.to_pylist():
        with local_npz(member["uri"]) as local:
            yield from _npz_member_tables(member, local)


def _npz_member_tables(member: dict[str, Any], local: str) -> Iterator[pa.Table]:
    labels: Iterator[tuple[int, np.ndarray]] | None = None
    if member["labels_array"]:
        labels = iter_npz_rows(local, member["labels_array"])
    for start, rows in iter_npz_rows(local, member["array"]):
        label_rows = next(labels)[1] if labels is not None else None  # same chunking
        n = len(rows)
        cols: dict[str, list[Any]] = {
            "kind": ["array"] * n,
            "uri": [f"{member['uri']}#{member['array']}/{start + i}" for i in range(n)],
            "size": [rows[0].nbytes] * n,
            "split": [member["split"]] * n,
            "data": [np.ascontiguousarray(r).tobytes() for r in rows],
            "shape": [list(rows.shape[1:])] * n,
            "dtype": [rows.dtype.str] * n,
            "label_values": ([None] * n if label_rows is None else
                             [np.atleast_1d(v).astype(np.float64).tolist() for v in label_rows]),
        }
        for name in ITEM_SCHEMA.names:
            cols.setdefault(name, [None] * n)
        yield pa.Table.from_pydict(cols, schema=ITEM_SCHEMA)


# ---------------------------------------------------------------------------- the whole source
def items_table(items: Iterable[dict[str, Any]]) -> pa.Table:
    cols: dict[str, list[Any]] = {f.name: [] for f in ITEM_SCHEMA}
    for it in items:
        for name in cols:
            cols[name].append(it.get(name))
    return pa.Table.from_pydict(cols, schema=ITEM_SCHEMA)


def list_source(spec: dict[str, Any]) -> Listing:
    """List a staging source as described by a StageSpec dict."""
    source, names = spec["source"], spec.get("label_names") or None
    fmt = spec.get("format", "auto")
    if fmt == "auto":
        detected = detect_format(source)
        fmt = "auto" if detected == "folder" else detected  # folders: DICOM by their files
    if fmt == "npz":
        members, total, label_names, multi, has_splits = npz_plan(source, names)
        table = pa.Table.from_pylist(members)
        return Listing("npz", table, total, label_names, multi, has_splits)
    skipped: list[str] = []
    if fmt == "csv":
        items = csv_items(source, spec["path_column"], spec["label_column"], spec["label_sep"],
                          spec.get("no_finding"), spec.get("patient_column"),
                          spec.get("images_root"), names)
        has_splits = False
    else:
        fmt, items, info = folder_items(source, fmt, names)
        has_splits, skipped = info["has_splits"], info["skipped"]
    found = sorted({lab for it in items if not it.get("error_type")
                    for lab in (it.get("labels") or [])})
    label_names = list(names) if names else found
    if fmt == "csv":
        # multi-label unless every row names exactly one label (a plain class column)
        multi = any(it["labels"] is not None and len(it["labels"]) != 1 for it in items
                    if not it.get("error_type"))
    else:
        multi = False
    return Listing(fmt, items_table(items), len(items), label_names, multi, has_splits,
                   len(skipped), skipped[:5])


# ---------------------------------------------------------------------------- decoding
def salt_fingerprint(salt: bytes | None = None) -> str:
    """A public tag of the de-identification salt: equal tags, comparable patient keys."""
    return Deidentifier(salt if salt is not None else deid_salt()).patient_key(
        "medray-salt-fingerprint")[:16]


def raw_split(item_split: str | None, raw_key: str, val_percent: float,
              test_percent: float) -> str:
    """The source's split when it has one, else a deterministic split of the raw patient key,
    so all images of a patient (or of a retrain.py _nohash_ group) land in one split."""
    return item_split or split_for(raw_key, val_percent, test_percent)


class BatchDecoder:
    """Reads and decodes a batch of items into shard rows or error rows (runs in Ray actors).

    ``options``: image_size, channels, keep_original, max_pixels, label_names, multi_label,
    val_percent, test_percent; optional job_id, salt_id (checked against this node's salt),
    known (a sorted numpy array of 32-byte digests already in the previous version, or an
    ObjectRef to one: those images are not decoded again), crash_dir (see ``_CrashGuard``).
    """

    def __init__(self, options: dict[str, Any]) -> None:
        self.size = int(options["image_size"])
        self.channels = int(options["channels"])
        self.keep_original = bool(options["keep_original"])
        self.max_pixels = int(options["max_pixels"])
        self.max_bytes = max_file_bytes(self.max_pixels)
        self.label_names: list[str] = list(options.get("label_names") or [])
        self.multi_label = bool(options.get("multi_label"))
        self.val, self.test = float(options["val_percent"]), float(options["test_percent"])
        self.job_id = options.get("job_id", "local")
        salt = deid_salt()
        if options.get("salt_id") and salt_fingerprint(salt) != options["salt_id"]:
            raise ConfigError("this node's de-identification salt differs from the driver's: "
                              "set the same MEDRAY_DEID_SALT on every node of the cluster")
        self.deid = Deidentifier(salt)
        known = options.get("known")
        if known is not None and not isinstance(known, np.ndarray):
            import ray

            known = ray.get(known)
        self.known = known if known is not None and len(known) else None
        self.pool = ThreadPoolExecutor(READ_THREADS)
        self.crash = _CrashGuard(options.get("crash_dir"), self.job_id)

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.to_pylist()
        # remote files: read ahead a few while decoding, so I/O overlaps decoding and memory
        # holds at most READ_THREADS files; local reads are faster inline than thread hand-offs
        reads = iter([it for it in items if it["kind"] == "file" and not it.get("error_type")
                      and "://" in it["uri"]])
        futures: dict[int, Future[bytes | tuple[str, str]]] = {}

        def top_up() -> None:
            while len(futures) < READ_THREADS:
                nxt = next(reads, None)
                if nxt is None:
                    return
                futures[id(nxt)] = self.pool.submit(self._read, nxt)

        rows = []
        for it in items:
            top_up()
            future = futures.pop(id(it), None)
            if future is not None:
                data: bytes | tuple[str, str] | None = future.result()
            elif it["kind"] == "file" and not it.get("error_type"):
                data = self._read(it)
            else:
                data = None
            rows.append(self._one(it, data))
        self.crash.clear()
        cols = {f.name: [r.get(f.name) for r in rows] for f in OUT_SCHEMA}
        return pa.Table.from_pydict(cols, schema=OUT_SCHEMA)

    # -- reading ------------------------------------------------------------------------------
    def _read(self, item: dict[str, Any]) -> bytes | tuple[str, str]:
        refused = self._too_large(item["size"]) if item.get("size") is not None else None
        if refused:
            return refused
        try:
            if "://" not in item["uri"]:  # a local path from the listing: plain open is fastest
                # O_NONBLOCK: a file swapped for a FIFO since listing must not block the read
                fd = os.open(item["uri"], os.O_RDONLY | os.O_NONBLOCK)
                with open(fd, "rb") as local:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        return ("unreadable", "not a regular file")
                    return self._too_large(st.st_size) or local.read()
            fs, path = source_filesystem(item["uri"])
            with fs.open_input_file(path) as fh:
                return self._too_large(fh.size()) or fh.read()
        except (OSError, InputError) as exc:
            return ("unreadable", f"{type(exc).__name__}: {exc}")

    def _too_large(self, size: int) -> tuple[str, str] | None:
        if size <= self.max_bytes:
            return None
        return ("too_large", f"the file has {size} bytes, more than the {self.max_bytes} "
                f"allowed by max_pixels={self.max_pixels}")

    # -- one item -----------------------------------------------------------------------------
    def _one(self, item: dict[str, Any], data: bytes | tuple[str, str] | None) -> dict[str, Any]:
        if item.get("error_type"):
            return self._error(item, item["error_type"], item.get("error_message") or "", 0,
                               stage="list")
        if self.crash.poisoned(item["uri"]):
            return self._error(item, "crashed", "decoding this input crashed the worker "
                               "process; it was skipped", item.get("size") or 0)
        try:
            if item["kind"] == "array":
                return self._array_row(item)
            if isinstance(data, tuple):
                return self._error(item, data[0], data[1], 0, stage="read")
            assert data is not None
            return self._file_row(item, data)
        except ConfigError:
            raise
        except ImageError as exc:
            return self._error(item, exc.kind, exc.message, item.get("size") or 0)
        except Exception as exc:  # noqa: BLE001 - one bad input must never stop the job
            log.warning("[%s] unexpected %s on %s", self.job_id, type(exc).__name__, item["uri"])
            return self._error(item, "invalid", f"{type(exc).__name__}: {exc}"[:300],
                               item.get("size") or 0)

    def _is_known(self, digest: str) -> bool:
        if self.known is None:
            return False
        # numpy "S32" drops trailing NUL bytes on both sides alike, so compare as S32 too
        probe = np.array([bytes.fromhex(digest)], dtype="S32")
        i = int(np.searchsorted(self.known, probe)[0])
        return i < len(self.known) and bool(self.known[i] == probe[0])

    def _file_row(self, item: dict[str, Any], data: bytes) -> dict[str, Any]:
        digest = image_id(data)
        if self._is_known(digest):
            return self._known_row(item, digest, len(data))
        self.crash.enter(item["uri"])
        try:
            img = decode_image(data, size=self.size, channels=self.channels, name=item["uri"],
                               max_pixels=self.max_pixels)
        except ImageError as exc:
            return self._error(item, exc.kind, exc.message, len(data), digest)
        raw_key = item.get("patient_key") or f"id:{digest}"
        if img.patient_ref and not raw_key.startswith("csv:"):
            raw_key = f"dicom:{img.patient_ref}"  # the raw ID is hashed below, never stored
        original = None
        if self.keep_original:
            # DICOM originals are stored de-identified (PS3.15 basic profile), never raw
            original = (deidentify_bytes(data, self.deid, max_pixels=self.max_pixels)[0]
                        if img.format == "dicom" else data)
        return self._row(item, digest, img.pixels, img.original_height, img.original_width,
                         img.format, metadata_json(img.metadata), raw_key, original, len(data))

    def _array_row(self, item: dict[str, Any]) -> dict[str, Any]:
        shape = tuple(item["shape"])
        arr = np.frombuffer(item["data"], dtype=np.dtype(item["dtype"])).reshape(shape)
        digest = image_id(item["data"] + str(shape).encode())
        if self._is_known(digest):
            return self._known_row(item, digest, len(item["data"]))
        labels = None
        if item.get("label_values") is not None:
            try:
                labels = self._array_labels(item["label_values"])
            except (ValueError, IndexError) as exc:
                return self._error(item, "bad_label", str(exc), len(item["data"]), digest)
        pixels = array_to_pixels(arr, size=self.size, channels=self.channels)
        return self._row({**item, "labels": labels}, digest, pixels, int(shape[0]),
                         int(shape[1]) if len(shape) > 1 else 1, "array", None,
                         f"id:{digest}", item["data"] if self.keep_original else None,
                         len(item["data"]), hash_patient=False)

    def _array_labels(self, values: list[float]) -> list[str]:
        vec = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(vec)):
            raise ValueError("the label is NaN or infinite")
        if self.multi_label:
            if len(vec) != len(self.label_names):
                raise ValueError(f"{len(vec)} label values for {len(self.label_names)} labels")
            return [self.label_names[j] for j in np.flatnonzero(vec > 0)]
        index = int(vec[0])
        if index != vec[0] or not 0 <= index < len(self.label_names):
            raise ValueError(f"label {vec[0]} is not a class index 0..{len(self.label_names) - 1}")
        return [self.label_names[index]]

    # -- rows ---------------------------------------------------------------------------------
    def _row(self, item: dict[str, Any], digest: str, pixels: np.ndarray, oh: int, ow: int,
             fmt: str, meta: str | None, raw_key: str, original: bytes | None, nbytes: int,
             hash_patient: bool = True) -> dict[str, Any]:
        return {
            "image_id": digest, "source_uri": item["uri"], "labels": item.get("labels"),
            "patient_key": self.deid.patient_key(raw_key) if hash_patient else None,
            "split": raw_split(item.get("split"), raw_key, self.val, self.test),
            "height": self.size, "width": self.size, "channels": self.channels,
            "pixels": pixels.tobytes(), "orig_height": oh, "orig_width": ow, "format": fmt,
            "metadata": meta, "original": original, "_bytes": nbytes, "_known": False,
        }

    def _known_row(self, item: dict[str, Any], digest: str, nbytes: int) -> dict[str, Any]:
        return {"image_id": digest, "source_uri": item["uri"], "labels": item.get("labels"),
                "split": "", "height": 0, "width": 0, "channels": 0, "pixels": b"",
                "_bytes": nbytes, "_known": True}

    def _error(self, item: dict[str, Any], kind: str, message: str, nbytes: int,
               digest: str | None = None, stage: str = "decode") -> dict[str, Any]:
        return {"source_uri": item["uri"], "image_id": digest or "", "split": "", "height": 0,
                "width": 0, "channels": 0, "pixels": b"", "_error_type": kind,
                "_error_message": message, "_stage": stage, "_bytes": nbytes, "_known": False}


class _CrashGuard:
    """Turns an input that kills the decoding process (a decoder segfault, an OOM kill) into an
    error row instead of an endless retry loop.

    Before each decode the actor notes the input in a small per-actor file; Ray restarts a dead
    actor under the same id and retries its batch, and the new incarnation finds the note and
    skips that input. ``MEDRAY_FAULT=stage_crash_on:TEXT`` kills the process on inputs whose
    URI contains TEXT (once), to test this.
    """

    def __init__(self, folder: str | None, job_id: str) -> None:
        self.fd: int | None = None
        self.bad: set[str] = set()
        self.fault = faults.stage_crash_text()
        if not folder:
            return
        try:
            import ray

            actor = ray.get_runtime_context().get_actor_id()
        except Exception:  # noqa: BLE001 - outside Ray (unit tests): no guard needed
            actor = None
        if not actor:
            return
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, f"{actor}.current")
        bad_list = os.path.join(folder, f"{actor}.bad")  # every poison seen, across restarts
        if os.path.exists(path):
            with open(path, "rb") as fh:
                note = fh.read()
            size = int.from_bytes(note[:4], "little") if len(note) >= 4 else 0
            last = note[4:4 + size].decode(errors="replace")
            if last:
                log.warning("[%s] a previous worker died while decoding an input; skipping it",
                            job_id)
                with open(bad_list, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(last) + "\n")  # JSON: a name may hold a newline
        if os.path.exists(bad_list):
            with open(bad_list, encoding="utf-8") as fh:
                self.bad = {json.loads(line) for line in fh if line.strip()}
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def poisoned(self, uri: str) -> bool:
        return uri in self.bad

    def enter(self, uri: str) -> None:
        if self.fd is not None:  # one syscall per image: a length-prefixed note at offset 0
            data = uri.encode()
            os.pwrite(self.fd, len(data).to_bytes(4, "little") + data, 0)
        if self.fault and self.fault in uri and self.fd is not None:
            faults.die()  # fault injection: see the class docstring

    def clear(self) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, b"\0\0\0\0", 0)


def items_per_block(n_items: int, batch: int, workers: int, bytes_per_item: float) -> int:
    """Items per Ray Data block: large blocks (about BLOCK_BYTES of decoded output) keep the
    per-block costs of the driver and Ray low; at least 8 blocks a worker keep them balanced."""
    by_size = int(BLOCK_BYTES // max(1.0, bytes_per_item))
    by_balance = math.ceil(n_items / max(1, 8 * workers))
    return max(batch, min(by_size, by_balance, 8192))
