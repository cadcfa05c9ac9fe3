"""Deleting a dataset version, and reading its errors back: what the CLI's ``datasets delete``,
``datasets errors`` and ``datasets reveal`` call (in the CLI process, no Ray).

A version's shards may be listed by later versions (re-staging reuses unchanged shards, same
paths). ``delete_version`` first removes the manifest (the version stops existing for every
reader at that moment), then every file under the version's folder that no other committed
version lists, and the private linkage; shards another version still lists stay where they
are. Together with ``medray stage --no-reuse`` this purges data staged under an older
de-identification profile: re-stage without reuse, then delete the old versions.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import pyarrow as pa

from medray.cluster.store import catalog, layout, linkage
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, NotFoundError

log = logging.getLogger(__name__)


def _referenced(lake: Lake, name: str, but: int) -> set[str]:
    """Every file the other committed versions of ``name`` list (shards and errors)."""
    kept: set[str] = set()
    for version in catalog.committed_versions(lake, name):
        if version != but:
            manifest = catalog.manifest(lake, name, version)
            kept.update(s["path"] for s in manifest["shards"])
            kept.update(manifest.get("error_files") or [])
    return kept


def delete_version(lake: Lake, ref: str, linkage_uri: str | None = None,
                   force: bool = False) -> dict[str, Any]:
    """Delete ``NAME:VERSION`` (the version must be named); what was removed and kept."""
    name, version = catalog.parse_ref(ref)
    if version is None:
        raise ConfigError(f"name the version to delete: {name}:N "
                          "(`medray datasets list` shows them)")
    if version not in catalog.committed_versions(lake, name):
        raise NotFoundError(f"dataset {name!r} has no committed version {version}")
    staging = [v for v in _all_versions(lake, name)
               if lake.exists(layout.staging_marker(name, v))]
    if staging and not force:
        raise ConfigError(f"{name} is being staged (version {staging}): a staging job may reuse "
                          f"shards of {name}:{version}; wait for it, or pass --force")
    kept = _referenced(lake, name, version)
    lake.delete(layout.manifest(name, version))  # from here on, no reader sees the version
    removed, still_listed = [], []
    for rel in lake.list_files(layout.dataset_version(name, version), recursive=True):
        if rel in kept:
            still_listed.append(rel)
            continue
        lake.delete(rel)
        removed.append(rel)
    if not still_listed:
        lake.delete_dir(layout.dataset_version(name, version))
    where = linkage.location(lake, name, version, linkage_uri)
    if "://" in where:
        src = Lake(where)
        for rel in src.list_files("", recursive=True):
            src.delete(rel)
    else:
        shutil.rmtree(where, ignore_errors=True)
    log.info("deleted %s:%d: %d files removed, %d kept for other versions", name, version,
             len(removed), len(still_listed))
    return {"dataset": name, "version": version, "removed_files": len(removed),
            "kept_files": still_listed}


def _all_versions(lake: Lake, name: str) -> list[int]:
    return sorted(int(v) for v in lake.list_dirs(layout.dataset_root(name)) if v.isdigit())


def errors(lake: Lake, ref: str, reveal: bool = False, linkage_uri: str | None = None
           ) -> list[dict[str, Any]]:
    """A version's errors rows; ``reveal``: DICOM pseudonyms replaced by their paths (the
    private linkage must be readable from here)."""
    name, version, manifest = catalog.resolve(lake, ref)
    tables = [lake.read_parquet(p) for p in manifest.get("error_files") or []]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    if reveal and any(str(r["source_uri"]).startswith("dicom:") for r in rows):
        paths = linkage.reveal(lake, name, version, linkage_uri)
        for r in rows:
            r["source_uri"] = paths.get(r["source_uri"], r["source_uri"])
    for r in rows:
        r["at"] = str(r.get("at"))
    return rows


def reveal(lake: Lake, ref: str, pseudonyms: list[str], linkage_uri: str | None = None
           ) -> dict[str, str | None]:
    """pseudonym -> source path (None when the version has no such pseudonym)."""
    name, version, _ = catalog.resolve(lake, ref)
    paths = linkage.reveal(lake, name, version, linkage_uri)
    return {p: paths.get(p) for p in pseudonyms}
