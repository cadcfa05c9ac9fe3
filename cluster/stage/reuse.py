"""Re-staging a source: what of the previous dataset version a new version reuses.

A previous version is used only when it came from the same source with the same content
options (``content_options``: what decides the bytes of a shard row). Its images are not
decoded again (the decoders get their digests); its shards whose images are all still there,
unchanged, are listed in the new manifest as they are (same paths); shards that lost images,
whose images changed labels or paths, or that are small while rows are written anyway, are
rewritten from their own rows.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from medray.cluster.stage.writer import ShardWriter
from medray.cluster.store import catalog
from medray.cluster.store.lake import Lake
from medray.workers.shards import SHARD_SCHEMA
from medray.workers.specs import StageSpec

log = logging.getLogger(__name__)
SMALL_SHARD = 0.25  # of the target size: balanced shards are at least about half of it


def content_options(spec: StageSpec, fmt: str, salt_id: str) -> dict[str, Any]:
    """What decides the bytes of a shard row: a previous version is reused only when equal."""
    return {"format": fmt, "image_size": spec.image_size, "channels": spec.channels,
            "keep_original": spec.keep_original, "max_pixels": spec.max_pixels,
            "val_percent": spec.val_percent, "test_percent": spec.test_percent,
            "salt_id": salt_id}


def _sig(labels: list[str] | None, uri: str) -> int:
    return hash((None if labels is None else tuple(labels), uri))


@dataclass
class Previous:
    """What the driver keeps of the previous version: one small record per image, and what
    this job has seen of them so far."""

    version: int
    manifest: dict[str, Any]
    rows: dict[bytes, tuple[int, int, str]]  # digest -> (shard index, labels+uri sig, split)
    known: np.ndarray                        # sorted "S32" digests, shipped to the decoders
    present: Counter[int] = field(default_factory=Counter)
    changed: dict[int, dict[str, tuple[list[str] | None, str]]] = field(
        default_factory=lambda: defaultdict(dict))

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    def take(self, image_id: str, labels: list[str] | None, uri: str) -> str | None:
        """Note a known image as still in the source; its split (an image keeps its split
        across versions), or None when this version does not hold it."""
        digest = bytes.fromhex(image_id)
        if digest not in self.rows:
            return None
        index, sig, split = self.rows[digest]
        self.present[index] += 1
        if _sig(labels, uri) != sig:
            self.changed[index][image_id] = (labels, uri)
        return split

    def small(self, shard_bytes: float) -> set[int]:
        """Shards under SMALL_SHARD of the target: merged into new shards when rows are written
        anyway, so nightly growth does not pile up small shards."""
        return {i for i, s in enumerate(self.shards) if s["bytes"] < SMALL_SHARD * shard_bytes}


def load_previous(lake: Lake, spec: StageSpec, content: dict[str, Any]) -> Previous | None:
    """The last committed version of the spec's dataset, when it can be reused."""
    name = spec.dataset
    versions = catalog.committed_versions(lake, name)
    if not versions:
        return None
    manifest = catalog.manifest(lake, name, versions[-1])
    if manifest.get("source") != spec.source:
        log.info("%s:%d came from %s: staging everything anew", name, versions[-1],
                 manifest.get("source"))
        return None
    if manifest.get("content_options") != content:
        log.info("%s:%d was staged with other options %s: staging everything anew", name,
                 versions[-1], manifest.get("content_options"))
        return None
    rows: dict[bytes, tuple[int, int, str]] = {}
    for index, shard in enumerate(manifest["shards"]):
        t = lake.read_parquet(shard["path"], columns=["image_id", "labels", "source_uri",
                                                       "split"])
        for iid, labels, uri, split in zip(*(t.column(i).to_pylist() for i in range(4)),
                                           strict=True):
            rows[bytes.fromhex(iid)] = (index, _sig(labels, uri), split)
    known = np.sort(np.array(list(rows), dtype="S32")) if rows else np.array([], dtype="S32")
    return Previous(versions[-1], manifest, rows, known)


def carry(previous: Previous, lake: Lake, writer: ShardWriter, seen: set[bytes],
          small: set[int]) -> list[dict[str, Any]]:
    """Previous shards listed as they are; the others' surviving rows go to the writer."""
    shards = previous.shards
    whole = {i for i, s in enumerate(shards)
             if previous.present[i] == s["rows"] and not previous.changed.get(i)}
    partial = [i for i in range(len(shards)) if previous.present[i] and i not in whole]
    # small shards are merged only when rows are written anyway (new or partial ones):
    # re-staging an unchanged source keeps every shard
    merging = bool(writer.pending_bytes or writer.shards or partial)
    rewrite = partial + sorted(i for i in whole if merging and i in small)
    kept = [s for i, s in enumerate(shards) if i in whole and i not in rewrite]
    left = [float(shards[i].get("raw_bytes", 0)) for i in rewrite]
    for n, i in enumerate(rewrite):
        reason = ("lost images" if previous.present[i] < shards[i]["rows"] else
                  "images with new labels or paths" if previous.changed.get(i) else "small")
        log.info("rewriting shard %s of version %d: %s", shards[i]["path"], previous.version,
                 reason)
        writer.add(_surviving_rows(previous, lake, i, seen), sum(left[n + 1:]))
    return kept


def _surviving_rows(previous: Previous, lake: Lake, index: int, seen: set[bytes]) -> pa.Table:
    table = lake.read_parquet(previous.shards[index]["path"])
    ids = table.column("image_id").to_pylist()
    mask = [previous.rows.get(bytes.fromhex(i), (-1,))[0] == index and
            bytes.fromhex(i) in seen for i in ids]
    table = table.filter(pa.array(mask))
    changes = previous.changed.get(index) or {}
    if changes:
        ids = table.column("image_id").to_pylist()
        labels = [changes[i][0] if i in changes else lab
                  for i, lab in zip(ids, table.column("labels").to_pylist(), strict=True)]
        uris = [changes[i][1] if i in changes else u
                for i, u in zip(ids, table.column("source_uri").to_pylist(), strict=True)]
        table = table.set_column(table.schema.get_field_index("labels"), "labels",
                                 pa.array(labels, SHARD_SCHEMA.field("labels").type))
        table = table.set_column(table.schema.get_field_index("source_uri"), "source_uri",
                                 pa.array(uris, pa.string()))
    return table.cast(SHARD_SCHEMA)
