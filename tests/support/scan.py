"""Look for secret strings in bytes, including inside Parquet (compressed columns) and zip
archives (.keras, .npz), which a plain byte search would miss."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import pyarrow.parquet as pq


def expand(data: bytes, depth: int = 0) -> Iterator[bytes]:
    """The object's bytes, then the decoded content of any container it is."""
    yield data
    if depth > 2:
        return
    if data[:4] == b"PAR1" and data[-4:] == b"PAR1":
        table = pq.read_table(io.BytesIO(data))
        for column in table.columns:
            for value in column.to_pylist():
                if isinstance(value, bytes):
                    yield from expand(value, depth + 1)
                elif value is not None:
                    yield str(value).encode()
    elif data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for name in zf.namelist():
                yield name.encode()
                yield from expand(zf.read(name), depth + 1)


def found_in(data: bytes | str, secrets: dict[str, str]) -> list[str]:
    """Names of the secrets that occur in ``data`` (or in what it contains)."""
    blob = data.encode() if isinstance(data, str) else data
    hits: set[str] = set()
    for part in expand(blob):
        for name, value in secrets.items():
            if value.encode() in part:
                hits.add(name)
    return sorted(hits)
