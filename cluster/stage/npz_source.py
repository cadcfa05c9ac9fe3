""".npz arrays as a staging source: MedMNIST's ``<split>_images`` / ``<split>_labels`` (or plain
``images`` / ``labels``).

The driver reads only the arrays' headers (and, for class-index labels, the label arrays, to
count the classes) and lists one item per image array; Ray tasks then stream each array
in chunks of rows (``read_npz_member``), so no array is ever loaded whole. Every array is
bounded like image files from its .npy header before a byte of it is read (``image_bound``):
an .npz bomb is one ``too_large`` errors row.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from medray.cluster.infra import logs
from medray.cluster.stage.listing import ITEM_SCHEMA, SPLIT_DIRS, Listing, items_table
from medray.cluster.store.lake import source_filesystem
from medray.workers.errors import ConfigError, NotFoundError
from medray.workers.pixels import DEFAULT_MAX_PIXELS, max_input_bytes

NPZ_CHUNK = 512  # array rows per item table: bounded memory, blocks large enough to be cheap
CHUNK_BYTES = 16 * 1024 * 1024  # and at most this many bytes of rows (at least one row)
MAX_LABEL_VALUES = 4096         # values in one label row: more is not a label array


# one row per image array of the file: what a read_npz_member task streams
MEMBER_SCHEMA = pa.schema([
    pa.field("kind", pa.string()), pa.field("uri", pa.string()), pa.field("array", pa.string()),
    pa.field("labels_array", pa.string()), pa.field("split", pa.string()),
    pa.field("rows", pa.int64()), pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()), pa.field("max_pixels", pa.int64()),
])


def _open_zip(uri: str) -> zipfile.ZipFile:
    fs, path = source_filesystem(uri)
    try:
        handle = fs.open_input_file(path)
        return zipfile.ZipFile(handle)
    except FileNotFoundError:
        raise NotFoundError(f"source not found: {uri}") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:  # ValueError: pyarrow's seek
        # before the start of a file shorter than a zip's end record (ArrowInvalid)
        raise ConfigError(f"cannot read {uri} as .npz: {exc}") from None


def _npy_header(fh: IO[bytes], uri: str, name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
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


def row_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of one row (one image, one label vector) of an array of ``shape``."""
    return int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize


def chunk_rows(shape: tuple[int, ...], dtype: np.dtype, chunk: int = NPZ_CHUNK) -> int:
    """Rows read at a time: at most ``chunk`` and about CHUNK_BYTES, at least one."""
    return max(1, min(chunk, CHUNK_BYTES // max(1, row_bytes(shape, dtype))))


def image_bound(shape: tuple[int, ...], dtype: np.dtype, max_pixels: int) -> str | None:
    """Why the images of an array of ``shape`` are refused unread (too_large), or None.

    Bounded like image files, from the .npy header alone: pixels (height x width) against
    ``max_pixels`` and bytes of one image against ``max_input_bytes``."""
    dims = shape[1:]
    pixels = int(np.prod(dims[:2], dtype=np.int64)) if dims else 1
    nbytes, limit = row_bytes(shape, dtype), max_input_bytes(max_pixels)
    if pixels > max_pixels:
        return (f"its images are {'x'.join(map(str, dims))} = {pixels} pixels, more than "
                f"max_pixels={max_pixels}; raise --max-pixels if such images are expected")
    if nbytes > limit:
        return (f"its images hold {nbytes} bytes each ({'x'.join(map(str, dims))} "
                f"{dtype}), more than the {limit} that max_pixels={max_pixels} allows")
    return None


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


def image_arrays(uri: str, members: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(split group, images array, labels array) of each image array; ConfigError when the
    file is not in the MedMNIST layout."""
    groups = sorted(k[: -len("_images")] for k in members if k.endswith("_images"))
    pairs = [(g, f"{g}_images", f"{g}_labels") for g in groups]
    if not pairs and "images" in members:
        pairs = [("", "images", "labels")]
    if not pairs:
        raise ConfigError(f"{uri} has no '<split>_images' arrays (MedMNIST layout); it has "
                          f"{sorted(members)}")
    return pairs


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


def iter_npz_rows(uri: str, name: str, chunk: int = NPZ_CHUNK, max_row_bytes: int | None = None
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, rows) chunks of one array, streamed: memory holds one chunk, not the array.

    At most ``chunk`` rows a chunk (callers that pair two arrays give both the same); a row
    larger than ``max_row_bytes`` is refused from the header, before anything is read."""
    with _open_zip(uri) as zf, zf.open(f"{name}.npy") as fh:
        shape, dtype, fortran = _npy_header(fh, uri, name)
        if fortran and len(shape) > 1:
            raise ConfigError(f"{uri}: {name} is stored in Fortran order: re-save it C-ordered")
        if not shape:
            raise ConfigError(f"{uri}: {name} is a scalar, not an array of rows")
        row = row_bytes(shape, dtype)
        if max_row_bytes is not None and row > max_row_bytes:
            raise ConfigError(f"{uri}: a row of {name} holds {row} bytes, more than "
                              f"{max_row_bytes}")
        for start in range(0, shape[0], chunk):
            count = min(chunk, shape[0] - start)
            buf = fh.read(count * row)
            if len(buf) != count * row:
                raise ConfigError(f"{uri}: {name} is truncated: rows from {start} are missing")
            yield start, np.frombuffer(buf, dtype=dtype).reshape((count, *shape[1:]))


def npz_listing(uri: str, names: list[str] | None,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Listing:
    """The listing of a MedMNIST-style npz: one item per image array (rows read later).

    An image array whose images exceed the bounds (``image_bound``) is listed as one error
    item (``too_large``) and never read."""
    members = npz_members(uri)
    items, total, widths, top = [], 0, set(), -1
    for group, images, labels in image_arrays(uri, members):
        shape, dtype = members[images]
        n = shape[0] if shape else 0
        split = SPLIT_DIRS.get(group.lower()) if group else None
        refused = image_bound(shape, dtype, max_pixels) if shape else None
        if refused:
            items.append({"kind": "npz", "uri": uri, "array": images, "labels_array": None,
                          "split": split, "rows": n, "error_type": "too_large",
                          "error_message": f"{images}: {refused}", "max_pixels": max_pixels})
            total += 1
            continue
        if labels in members:
            lshape, ldtype = members[labels]
            if not lshape or lshape[0] != n:
                raise ConfigError(f"{uri}: {labels} has shape {lshape}, {images} has {n} rows")
            width = 1 if len(lshape) == 1 else int(np.prod(lshape[1:], dtype=np.int64))
            if width > MAX_LABEL_VALUES:
                raise ConfigError(f"{uri}: {labels} has {width} values a row, more than "
                                  f"{MAX_LABEL_VALUES}: it is not a label array")
            widths.add(width)
            if len(lshape) == 1 or (len(lshape) == 2 and lshape[1] == 1):
                for _, chunk in iter_npz_rows(uri, labels, chunk=chunk_rows(lshape, ldtype,
                                                                              1 << 20)):
                    finite = chunk[np.isfinite(chunk)] if chunk.dtype.kind == "f" else chunk
                    if finite.size:
                        top = max(top, int(finite.max()))
        items.append({"kind": "npz", "uri": uri, "array": images,
                      "labels_array": labels if labels in members else None,
                      "split": split, "rows": n, "error_type": None, "error_message": None,
                      "max_pixels": max_pixels})
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
    return Listing("npz", pa.Table.from_pylist(items, schema=MEMBER_SCHEMA), total, label_names,
                   multi, has_splits)


# ---------------------------------------------------------------------------- Ray tasks
def read_npz_member(batch: pa.Table) -> Iterator[pa.Table]:
    """A Ray task (``pipeline``): one member descriptor in, item tables of array rows out (at
    most NPZ_CHUNK rows and about CHUNK_BYTES each)."""
    logs.configure()
    for member in batch.to_pylist():
        if member.get("error_type"):  # refused from its header while listing: never read
            yield _member_error(member, member["error_type"], member["error_message"])
            continue
        with local_npz(member["uri"]) as local:
            yield from _npz_member_tables(member, local)


def _member_error(member: dict[str, Any], kind: str, message: str) -> pa.Table:
    return items_table([{"kind": "file", "uri": f"{member['uri']}#{member['array']}",
                         "split": member["split"], "error_type": kind,
                         "error_message": message}])


def _npz_member_tables(member: dict[str, Any], local: str) -> Iterator[pa.Table]:
    members = npz_members(local)
    shape, dtype = members[member["array"]]
    refused = image_bound(shape, dtype, member["max_pixels"]) if shape else None
    if refused:  # the file changed since it was listed: the same bound, checked again
        yield _member_error(member, "too_large", f"{member['array']}: {refused}")
        return
    chunk = chunk_rows(shape, dtype)
    labels: Iterator[tuple[int, np.ndarray]] | None = None
    if member["labels_array"]:
        labels = iter_npz_rows(local, member["labels_array"], chunk=chunk,
                               max_row_bytes=8 * MAX_LABEL_VALUES)
    for start, rows in iter_npz_rows(local, member["array"], chunk=chunk):
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
