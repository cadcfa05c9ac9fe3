"""Listing a staging source into work items: format detection, folder and S3 trees, skip rules.

Listing runs on the job driver and produces item rows (``ITEM_SCHEMA``) that travel to the
decoders as one compact Arrow table. Folders are listed with one request stream per top-level
folder, in parallel threads, so an S3 prefix with many sub-prefixes lists in parallel. A folder's
rows go into Arrow a chunk at a time (``ItemsBuilder``): a dict per file for the whole tree
would cost the driver about a kilobyte per image at its peak (issue 17).

Folder layouts (``--format auto`` picks one):
- folder: ``root/<label>/...`` as TensorFlow's retrain.py read it, or ``root/<split>/<label>/...``
  when every top-level folder is a split name; a flat folder stages with unknown labels.
- dicom: the same tree rules, any file name (DICOM files often have none); auto-detected when
  most files end in .dcm/.dicom. Labels come from folders only in the plain label/file shape,
  never from deeper trees (which are usually patient/study/series folders), nor from folders
  named like patients (a ``^`` or three digits in a row: ``DOE^JANE_12345``).
CSV manifests and .npz arrays have their own modules (``csv_source``, ``npz_source``).
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from medray.cluster.store.lake import source_filesystem, source_uri
from medray.workers.errors import ConfigError, NotFoundError
from medray.workers.shards import nohash_key

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
LIST_THREADS = 8
_PATIENT_LIKE = re.compile(r"\^|\d{3,}")  # DICOM folder names that are never class labels

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
    pa.field("attributes", pa.string()),      # CSV: typed attribute values as a JSON object
])


@dataclass(frozen=True)
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
    # (column, kind) of the typed patient attribute columns every shard row has
    attributes: tuple[tuple[str, str], ...] = ()
    bad_attributes: dict[str, int] = field(default_factory=dict)  # values read as null


@dataclass(frozen=True)
class FolderItems:
    """The items of a folder tree and what the tree's shape said about them."""

    format: str                         # "folder" or "dicom"
    table: pa.Table                     # ITEM_SCHEMA rows, in listing order
    has_splits: bool
    skipped: list[str]                  # side files left out, relative to the root

    @property
    def items(self) -> list[dict[str, Any]]:
        """The rows as dicts (for small trees and tests; the job keeps the table)."""
        return self.table.to_pylist()


def items_table(items: Iterable[dict[str, Any]]) -> pa.Table:
    """Item dicts (any subset of ITEM_SCHEMA's keys) as one ITEM_SCHEMA table."""
    builder = ItemsBuilder()
    for it in items:
        builder.add(it)
    return builder.table()


class ItemsBuilder:
    """ITEM_SCHEMA rows added one at a time and turned into Arrow every ``chunk`` rows, so a
    listing holds Python objects for one chunk of files, never for the whole collection."""

    def __init__(self, chunk: int = 8192) -> None:
        self.chunk = chunk
        self.cols: dict[str, list[Any]] = {f.name: [] for f in ITEM_SCHEMA}
        self.chunks: list[pa.Table] = []
        self.pending = 0

    def add(self, item: dict[str, Any]) -> None:
        for name, col in self.cols.items():
            col.append(item.get(name))
        self.pending += 1
        if self.pending >= self.chunk:
            self._flush()

    def table(self) -> pa.Table:
        """Every row added so far, as one ITEM_SCHEMA table (of ``chunk``-row chunks: joining
        them would copy the whole listing once more at its peak)."""
        self._flush()
        if not self.chunks:
            return ITEM_SCHEMA.empty_table()
        return pa.concat_tables(self.chunks)

    def _flush(self) -> None:
        if self.pending:
            self.chunks.append(pa.Table.from_pydict(self.cols, schema=ITEM_SCHEMA))
            self.cols = {name: [] for name in self.cols}
            self.pending = 0


# ---------------------------------------------------------------------------- format
def format_by_name(source: str) -> str | None:
    """npz, csv or dicom when the name says so; None when only the files can tell."""
    lower = source.lower().rstrip("/")
    if lower.endswith(".npz"):
        return "npz"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith(tuple(DICOM_EXT)):
        return "dicom"
    return None


def detect_format(source: str) -> str:
    """npz, csv, dicom or folder, from the name and (for folders) later from the files."""
    by_name = format_by_name(source)
    if by_name is not None:
        return by_name
    fs, path = source_filesystem(source)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise NotFoundError(f"source not found: {source}: give an existing folder, file or "
                            "s3://bucket/prefix")
    extension = posixpath.splitext(source.lower().rstrip("/"))[1]
    if info.type == pafs.FileType.File and extension not in IMAGE_EXT:
        raise ConfigError(f"cannot tell the format of {source}: pass --format "
                          "folder|npz|csv|dicom")
    return "folder"


# ---------------------------------------------------------------------------- trees
@dataclass(frozen=True, slots=True)  # one per file of a tree: slots keep it small
class Entry:
    """One file of a tree: its path below the root, its size, or why it cannot be read."""

    rel: str
    size: int | None
    error: tuple[str, str] | None = None


def _walk_local(root: str, top: str) -> Iterator[Entry]:
    """Files below ``top`` without following symlinked folders (a link to an ancestor would
    loop); sockets, FIFOs and devices are left out (reading a FIFO blocks forever)."""
    prefix = root.rstrip(os.sep) + os.sep
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            # iterated, not listed: a folder of 100k files would hold 100k DirEntry objects
            entries = os.scandir(folder)
        except OSError as exc:
            yield Entry(os.path.relpath(folder, root), None,
                        ("unreadable", f"cannot list folder: {type(exc).__name__}: {exc}"))
            continue
        with entries:
            yield from _folder_entries(entries, root, prefix, stack)


def _folder_entries(entries: Iterator[os.DirEntry[str]], root: str, prefix: str,
                    stack: list[str]) -> Iterator[Entry]:
    """The files of one open folder; its subfolders go on ``stack``."""
    for entry in entries:
        path = entry.path
        rel = (path[len(prefix):] if path.startswith(prefix) else
               os.path.relpath(path, root)).replace(os.sep, "/")
        try:
            if entry.is_dir(follow_symlinks=False):
                if not _hidden(entry.name):  # never walk into .git and the like
                    stack.append(entry.path)
                continue
            st = entry.stat(follow_symlinks=True)
        except OSError as exc:  # a dangling link or a file that vanished
            yield Entry(rel, None, ("unreadable", f"{type(exc).__name__}: {exc}"))
            continue
        if stat.S_ISREG(st.st_mode):
            yield Entry(rel, st.st_size)


def list_tree(source: str) -> tuple[pafs.FileSystem, str, list[Entry]]:
    """(fs, root path, entries) for a folder or one file; top-level folders in parallel."""
    fs, root = source_filesystem(source)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise NotFoundError(f"source not found: {source}: give an existing folder, file or "
                            "s3://bucket/prefix")
    if info.type == pafs.FileType.File:
        parent, name = posixpath.split(root)
        return fs, parent, [Entry(name, info.size)]
    local = isinstance(fs, pafs.LocalFileSystem)
    top = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    entries = [Entry(i.base_name, i.size) for i in top if i.type == pafs.FileType.File]
    folders = [i.path for i in top
               if i.type == pafs.FileType.Directory and not _hidden(i.base_name)]

    def list_one(path: str) -> list[Entry]:
        if local:
            return list(_walk_local(root, path))
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except OSError as exc:
            rel = path[len(root):].lstrip("/")
            return [Entry(rel, None, ("unreadable", f"cannot list: {exc}"))]
        return [Entry(i.path[len(root):].lstrip("/"), i.size) for i in infos
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


# ---------------------------------------------------------------------------- folder items
def folder_items(source: str, fmt: str = "auto",
                 label_names: list[str] | None = None) -> FolderItems:
    """Items of a folder tree (or a single image/DICOM file)."""
    fs, root, entries = list_tree(source)
    kept: list[Entry] = []
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
    # the paths are split again in each pass rather than kept split: a list per file is what
    # made a large listing's peak memory grow
    top_dirs = {e.rel.split("/", 1)[0] for e in kept if "/" in e.rel}
    has_splits = bool(top_dirs) and all(d.lower() in SPLIT_DIRS for d in top_dirs)
    depth = 2 if has_splits else 1  # path parts before the label folder name
    use_labels = any(e.rel.count("/") >= depth for e in kept)
    if fmt == "dicom" and use_labels:
        # patient/study/series trees are not label folders (and their names may be PHI), nor
        # are folders named like patients (a '^' of a person name, a record number's digits)
        labelled = [p for p in (e.rel.split("/") for e in kept) if len(p) > depth]
        use_labels = all(len(p) == depth + 1 for p in labelled) and not any(
            _PATIENT_LIKE.search(p[depth - 1]) for p in labelled)
    known = set(label_names or [])
    items = ItemsBuilder()
    for e in kept:
        parts = e.rel.split("/")
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
        items.add(item)
    table = items.table()
    if table.num_rows == 0:
        raise ConfigError(f"no image files under {source} ({len(skipped)} other files skipped)")
    return FolderItems(fmt, table, has_splits, skipped)
