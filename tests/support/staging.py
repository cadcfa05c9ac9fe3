"""The stage job run in the test process without Ray: ``stage_inline`` runs the real
``cluster.stage.job.run`` (listing, reuse, shard writer, manifest) with the Ray pipeline
replaced by the same decoder called inline, so unit tests can stage every source kind in a
second; ``version_rows`` reads a committed version back with plain pyarrow."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medray.cluster.infra.context import JobContext
from medray.cluster.stage import job, npz_source, pipeline, remote
from medray.cluster.stage.listing import Listing
from medray.cluster.store.lake import Lake
from medray.workers.specs import StageSpec


def inline_batches(listing: Listing, spec: StageSpec,
                   options: remote.DecodeOptions) -> Iterator[pa.Table]:
    """What ``pipeline.decoded_batches`` yields, computed in this process, in listing order."""
    decoder = remote.BatchDecoder(spec, options)
    items = listing.items
    if listing.format == "npz":
        items = pa.concat_tables([t for i in range(items.num_rows)
                                  for t in npz_source.read_npz_member(items.slice(i, 1))])
    for start in range(0, items.num_rows, spec.decode_batch):
        yield decoder(items.slice(start, spec.decode_batch))


def stage_inline(monkeypatch: pytest.MonkeyPatch, **values: Any) -> dict[str, Any]:
    """Run a stage job of ``StageSpec(**values)`` (``lake`` among them); its result."""
    monkeypatch.setattr(pipeline, "decoded_batches", inline_batches)
    # the private linkage beside the lake, not in the session's MEDRAY_HOME
    spec = StageSpec(**{"image_size": 16, "linkage": f"{values['lake']}-linkage", **values})
    ctx = JobContext(job_id=f"test-{uuid.uuid4().hex[:8]}", kind="stage", submitted_by="test",
                     submitted_at=None)
    return job.run(spec, Lake(spec.lake), ctx)


def version_rows(lake: str | Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """image_id -> row of every shard a manifest lists (a local lake)."""
    tables = [pq.read_table(f"{lake}/{s['path']}") for s in manifest["shards"]]
    rows = pa.concat_tables(tables).to_pylist() if tables else []
    out = {r["image_id"]: r for r in rows}
    assert len(out) == len(rows), "an image is in two rows of one version"
    return out
