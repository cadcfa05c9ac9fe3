"""The private linkage of a dataset version: which source path each DICOM pseudonym stands for.

Lake rows of a DICOM input carry ``dicom:<keyed hash>`` instead of its path (paths name
patients: ``DOE^JANE_12345/20240101/...``). So that an authorised user can trace a prediction or
an errors row back to its file, the stage job writes the pairs here, never to the lake:

- by default under ``MEDRAY_HOME/linkage/<lake tag>/<dataset>/<version>/`` of the node that ran
  the job (the machine itself for a local cluster), folders 0700, files 0600;
- with ``--linkage URI``, under ``URI/<dataset>/<version>/`` (a folder or an s3:// prefix the
  user controls and protects).

``reveal`` reads them back (``medray datasets errors NAME:V --reveal``, ``datasets reveal``,
and the publish job, which finds a PACS instance's original UIDs in its DICOMweb URI). It lives
in ``store`` because two jobs use it: the stage job writes it, the publish job reads it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medray.cluster.infra.home import medray_home
from medray.cluster.store.lake import Lake
from medray.workers.errors import NotFoundError

SCHEMA = pa.schema([pa.field("pseudonym", pa.string()), pa.field("source_uri", pa.string())])
PART_ROWS = 200_000


def location(lake: Lake, dataset: str, version: int, linkage: str | None) -> str:
    """Where a version's linkage lives: a local folder path or an s3:// URI."""
    if linkage:
        return f"{linkage.rstrip('/')}/{dataset}/{version}"
    tag = hashlib.sha256(lake.uri.encode()).hexdigest()[:12]  # two lakes, two name spaces
    return str(medray_home() / "linkage" / tag / dataset / str(version))


class LinkageSink:
    """Collects (pseudonym, path) pairs while staging; writes them in parts, privately."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.pending: dict[str, str] = {}
        self.parts = 0
        self.entries = 0

    def add(self, pseudonyms: list[str], paths: list[str | None]) -> None:
        for shown, raw in zip(pseudonyms, paths, strict=True):
            if raw is not None and shown not in self.pending:
                self.pending[shown] = raw
        if len(self.pending) >= PART_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.table({"pseudonym": list(self.pending), "source_uri":
                          list(self.pending.values())}, schema=SCHEMA)
        _write(self.where, f"part-{self.parts:05d}.parquet", table)
        self.parts += 1
        self.entries += table.num_rows
        self.pending = {}

    def remove(self) -> None:
        """Drop what a failed job wrote (its version never existed)."""
        if "://" not in self.where:
            for path in Path(self.where).glob("part-*.parquet"):
                path.unlink(missing_ok=True)
        else:
            lake = Lake(self.where)
            for rel in lake.list_files(""):
                lake.delete(rel)


def _write(where: str, name: str, table: pa.Table) -> None:
    if "://" in where:
        Lake(where).write_parquet(name, table)
        return
    os.makedirs(where, mode=0o700, exist_ok=True)
    os.chmod(where, 0o700)
    path = os.path.join(where, name)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # 0600 before any byte
    with os.fdopen(fd, "wb") as fh:
        pq.write_table(table, fh)
    os.replace(tmp, path)


def reveal(lake: Lake, dataset: str, version: int, linkage: str | None) -> dict[str, str]:
    """pseudonym -> source path of a version; NotFoundError naming where it looked."""
    where = location(lake, dataset, version, linkage)
    tables = []
    if "://" in where:
        src = Lake(where)
        tables = [src.read_parquet(rel) for rel in src.list_files("") if rel.endswith(".parquet")]
    elif os.path.isdir(where):
        tables = [pq.read_table(p) for p in sorted(Path(where).glob("part-*.parquet"))]
    if not tables:
        raise NotFoundError(f"no linkage for {dataset}:{version} at {where}: it is written on "
                            "the node that staged the version (or where --linkage said)")
    table = pa.concat_tables(tables)
    return dict(zip(table.column("pseudonym").to_pylist(),
                    table.column("source_uri").to_pylist(), strict=True))
