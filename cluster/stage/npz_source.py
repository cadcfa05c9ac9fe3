""".npz arrays as a staging source: MedMNIST's ``<split>_images`` / ``<split>_labels`` (or plain
``images`` / ``labels``).

The driver reads only the arrays' headers (and, for class-index labels, the label arrays, to
count the classes) and lists one item per image array; Ray tasks then stream each array in
chunks of rows (``remote.read_npz_member``), so no array is ever loaded whole.
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

from medray.cluster.stage.listing import SPLIT_DIRS, Listing
from medray.cluster.store.lake import source_filesystem
from medray.workers.errors import ConfigError, NotFoundError

NPZ_CHUNK = 512  # array rows per item table: bounded memory, blocks large enough to be cheap


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


def npz_listing(uri: str, names: list[str] | None) -> Listing:
    """The listing of a MedMNIST-style npz: one item per image array (rows read later)."""
    members = npz_members(uri)
    items, total, widths, top = [], 0, set(), -1
    for group, images, labels in image_arrays(uri, members):
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
    return Listing("npz", pa.Table.from_pylist(items), total, label_names, multi, has_splits)
