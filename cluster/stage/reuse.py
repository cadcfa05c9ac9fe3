"""Re-staging a source: what of the previous dataset version a new version reuses.

A previous version is used only when it came from the same source with the same content
options (``content_options``: what decides the bytes of a shard row). Its images are not
decoded again (the decoders get their digests); its shards whose images are all still there,
unchanged, are listed in the new manifest as they are (same paths); shards that lost images,
whose images changed labels, paths, splits, patient keys or patient attributes in the source,
or that are small
while rows are written anyway, are rewritten from their own rows. An image keeps nothing of
its previous description but its pixels: when the source moved it (from ``train/`` to ``test/``,
or to another patient in a CSV manifest), it moves in the new version, and the manifest counts
the moves.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from medray.cluster.stage.writer import ShardWriter
from medray.cluster.store import catalog
from medray.cluster.store.lake import Lake
from medray.workers.deid import PROFILE_VERSION
from medray.workers.imaging import DECODER_VERSION
from medray.workers.shards import SHARD_SCHEMA
from medray.workers.specs import StageSpec

log = logging.getLogger(__name__)
SMALL_SHARD = 0.25  # of the target size: balanced shards are at least about half of it


class Change(NamedTuple):
    """How the source now describes an image of the previous version."""

    labels: list[str] | None
    source_uri: str
    split: str
    patient_key: str | None
    attributes: dict[str, Any] | None  # None: as before


def content_options(spec: StageSpec, fmt: str, salt_id: str,
                    attributes: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """What decides the bytes of a shard row: a previous version is reused only when equal.

    The de-identification profile's version and the decoder's are part of it: data staged
    under an older profile or decoder is processed again, never carried over."""
    return {"format": fmt, "image_size": spec.image_size, "channels": spec.channels,
            "keep_original": spec.keep_original, "max_pixels": spec.max_pixels,
            "val_percent": spec.val_percent, "test_percent": spec.test_percent,
            "salt_id": salt_id, "deid_profile": PROFILE_VERSION,
            "decoder": DECODER_VERSION, "retain": sorted(spec.retain),
            "clean": sorted(spec.clean), "allow_burned_in": spec.allow_burned_in,
            # the typed attribute columns: shards of one version all have the same columns
            "attributes": [list(a) for a in attributes]}


def _sig(labels: list[str] | None, uri: str) -> int:
    return hash((None if labels is None else tuple(labels), uri))


def _attr_sig(values: dict[str, Any] | None) -> int:
    return hash(json.dumps(values, sort_keys=True)) if values else 0


class _Old(NamedTuple):
    """One image of the previous version, kept small: labels and path as a hash."""

    shard: int               # its shard's index in the previous manifest
    sig: int                 # _sig(labels, source_uri)
    split: str
    key: str | None          # patient_key
    attrs: int               # _attr_sig(attribute columns)


@dataclass
class Previous:
    """What the driver keeps of the previous version: one small record per image, and what
    this job has seen of them so far."""

    version: int
    manifest: dict[str, Any]
    rows: dict[bytes, _Old]
    known: np.ndarray        # sorted "S32" digests, shipped to the decoders
    present: Counter[int] = field(default_factory=Counter)
    changed: dict[int, dict[str, Change]] = field(default_factory=lambda: defaultdict(dict))
    moved: int = 0           # images whose split the source changed
    rekeyed: int = 0         # images whose patient key the source changed

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.manifest["shards"])

    def take(self, image_id: str, labels: list[str] | None, uri: str, split: str,
             key: str | None, keep_key: bool = False,
             attributes: dict[str, Any] | None = None) -> tuple[str, str | None] | None:
        """Note a known image as still in the source, as the source now describes it; its
        (split, patient key) in the new version, or None when this version does not hold it.

        ``split`` "" and ``keep_key`` (a DICOM, whose patient is in its bytes) keep the
        previous split and key; otherwise the source's split and key win, so an image the
        source moved (from train/ to test/, to another patient) moves in the new version.
        ``attributes`` (a manifest's values) replace the previous ones; None keeps them."""
        digest = bytes.fromhex(image_id)
        old = self.rows.get(digest)
        if old is None:
            return None
        split = split or old.split
        key = old.key if keep_key else key
        self.present[old.shard] += 1
        self.moved += split != old.split
        self.rekeyed += key != old.key
        if attributes is not None and _attr_sig(attributes) == old.attrs:
            attributes = None
        if (_sig(labels, uri) != old.sig or split != old.split or key != old.key
                or attributes is not None):
            self.changed[old.shard][image_id] = Change(labels, uri, split, key, attributes)
        return split, key

    def small(self, shard_bytes: float) -> set[int]:
        """Shards under SMALL_SHARD of the target: merged into new shards when rows are written
        anyway, so nightly growth does not pile up small shards."""
        return {i for i, s in enumerate(self.shards) if s["bytes"] < SMALL_SHARD * shard_bytes}


def load_previous(lake: Lake, spec: StageSpec, content: dict[str, Any],
                  source: str | None = None) -> Previous | None:
    """The last committed version of the spec's dataset, when it came from ``source`` (how
    the manifest names the spec's source: ``remote.source_label``) and can be reused."""
    source = spec.source if source is None else source
    name = spec.dataset
    versions = catalog.committed_versions(lake, name)
    if not versions:
        return None
    manifest = catalog.manifest(lake, name, versions[-1])
    if manifest.get("source") != source:
        log.info("%s:%d came from %s: staging everything anew", name, versions[-1],
                 manifest.get("source"))
        return None
    if manifest.get("content_options") != content:
        log.info("%s:%d was staged with other options %s: staging everything anew", name,
                 versions[-1], manifest.get("content_options"))
        return None
    rows: dict[bytes, _Old] = {}
    columns = ["image_id", "labels", "source_uri", "split", "patient_key"]
    kept = [name for name, _ in content.get("attributes", [])]
    for index, shard in enumerate(manifest["shards"]):
        t = lake.read_parquet(shard["path"], columns=columns + kept)
        attrs = t.select(kept).to_pylist() if kept else [None] * t.num_rows
        for (iid, labels, uri, split, key), values in zip(
                zip(*(t.column(c).to_pylist() for c in columns), strict=True), attrs,
                strict=True):
            rows[bytes.fromhex(iid)] = _Old(index, _sig(labels, uri), split, key,
                                            _attr_sig(values))
    known = np.sort(np.array(list(rows), dtype="S32")) if rows else np.array([], dtype="S32")
    return Previous(versions[-1], manifest, rows, known)


def carry(previous: Previous, lake: Lake, writer: ShardWriter, seen: set[bytes],
          small: set[int], schema: pa.Schema) -> list[dict[str, Any]]:
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
                  "images with new labels, paths, splits, patients or attributes"
                  if previous.changed.get(i) else "small")
        log.info("rewriting shard %s of version %d: %s", shards[i]["path"], previous.version,
                 reason)
        writer.add(_surviving_rows(previous, lake, i, seen, schema), sum(left[n + 1:]))
    return kept


def _surviving_rows(previous: Previous, lake: Lake, index: int, seen: set[bytes],
                    schema: pa.Schema) -> pa.Table:
    table = lake.read_parquet(previous.shards[index]["path"])
    ids = table.column("image_id").to_pylist()
    mask = [getattr(previous.rows.get(bytes.fromhex(i)), "shard", -1) == index and
            bytes.fromhex(i) in seen for i in ids]
    table = table.filter(pa.array(mask))
    changes = previous.changed.get(index) or {}
    if changes:
        ids = table.column("image_id").to_pylist()
        for column, at in (("labels", 0), ("source_uri", 1), ("split", 2), ("patient_key", 3)):
            values = [changes[i][at] if i in changes else v
                      for i, v in zip(ids, table.column(column).to_pylist(), strict=True)]
            table = table.set_column(table.schema.get_field_index(column), column,
                                     pa.array(values, schema.field(column).type))
        for column in _attribute_names(schema):
            new = [changes[i].attributes if i in changes else None for i in ids]
            values = [n[column] if n is not None else v for n, v in
                      zip(new, table.column(column).to_pylist(), strict=True)]
            table = table.set_column(table.schema.get_field_index(column), column,
                                     pa.array(values, schema.field(column).type))
    return table.select(schema.names).cast(schema)


def _attribute_names(schema: pa.Schema) -> list[str]:
    """The attribute columns of a version's shard schema: those after SHARD_SCHEMA's."""
    return [n for n in schema.names if n not in SHARD_SCHEMA.names]
