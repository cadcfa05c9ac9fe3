"""Dataset versions in the lake (the catalog); a version's manifest is its commit point."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from medray.cluster.store import atomic, layout
from medray.cluster.store.lake import Lake
from medray.workers.errors import NotFoundError


def _versions(lake: Lake, name: str) -> list[int]:
    return sorted(int(v) for v in lake.list_dirs(layout.dataset_root(name)) if v.isdigit())


def committed_versions(lake: Lake, name: str) -> list[int]:
    return [v for v in _versions(lake, name) if lake.exists(layout.manifest(name, v))]


def next_version(lake: Lake, name: str) -> int:
    """One past every version folder, committed or not, so an abandoned attempt is never reused.

    Not a claim: two stagings may both see the same number. Use :func:`claim_version`."""
    existing = _versions(lake, name)
    return (existing[-1] + 1) if existing else 1


def claim_version(lake: Lake, name: str, owner: str | None = None) -> int:
    """A version number of dataset ``name`` that no other staging can get: the first past
    every version folder whose ``_CLAIM.json`` this call creates (create-if-absent: S3
    ``If-None-Match: *``, a hard link on a local disk). Claim before writing anything under
    the version; ``owner`` (the job id) is recorded in the claim."""
    doc = {"dataset": name, "owner": owner or f"pid-{os.getpid()}",
           "claimed_at": datetime.now(UTC).isoformat()}
    return atomic.claim_next(lake, _versions(lake, name),
                             lambda v: layout.dataset_claim(name, v), doc)


def parse_ref(ref: str) -> tuple[str, int | None]:
    name, _, version = ref.partition(":")
    if version and not version.isdigit():
        raise NotFoundError(f"dataset version must be a number: {ref!r}")
    return name, int(version) if version else None


def resolve(lake: Lake, ref: str) -> tuple[str, int, dict[str, Any]]:
    name, version = parse_ref(ref)
    versions = committed_versions(lake, name)
    if not versions:
        raise NotFoundError(
            f"no dataset {name!r} in {lake.uri}: "
            f"stage it with `medray stage SOURCE --dataset {name}`"
        )
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise NotFoundError(f"dataset {name!r} has no committed version {version} (has {versions})")
    return name, version, manifest(lake, name, version)


def manifest(lake: Lake, name: str, version: int) -> dict[str, Any]:
    return dict(lake.read_json(layout.manifest(name, version)))


def list_datasets(lake: Lake) -> list[dict[str, Any]]:
    rows = []
    for name in lake.list_dirs(layout.DATASETS):
        for version in committed_versions(lake, name):
            m = manifest(lake, name, version)
            rows.append(
                {
                    "dataset": name,
                    "version": version,
                    "images": m["images"],
                    "errors": m["errors"],
                    "labels": m["labels"],
                    "created_at": m["created_at"],
                }
            )
    return rows
