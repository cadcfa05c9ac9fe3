"""Bounded inputs of the stage job, without Ray: .npz members checked from their .npy headers
before a byte of them is read (an .npz bomb becomes one ``too_large`` errors row), rows read
in chunks of bounded bytes, label arrays bounded, and the job ending with the bomb reported.

Issue #14: an .npz had no size bound (compressed zeros inflated past memory)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medray.cluster.stage import npz_source, remote
from medray.workers.errors import ConfigError
from medray.workers.pixels import max_input_bytes
from medray.workers.specs import StageSpec
from tests.support.data import npz_bomb
from tests.support.staging import stage_inline


def _decode(items: pa.Table, names: list[str], **spec) -> list[dict]:
    options = remote.DecodeOptions(label_names=tuple(names))
    decoder = remote.BatchDecoder(StageSpec(source="/x", dataset="d", image_size=16, **spec),
                                  options)
    return decoder(items).to_pylist()


def test_an_npz_bomb_is_one_error_item_listed_from_its_header(tmp_path):
    path = npz_bomb(tmp_path / "bomb.npz", side=40_000, real=False)  # claims 1.6 gigapixels
    listed = npz_source.npz_listing(str(path), None, max_pixels=50_000_000)
    assert listed.inputs == 1 + 4  # the bomb counts once, the 4 good images each
    members = {m["array"]: m for m in listed.items.to_pylist()}
    assert members["train_images"]["error_type"] == "too_large"
    assert "1600000000 pixels" in members["train_images"]["error_message"]
    assert members["test_images"]["error_type"] is None
    items = pa.concat_tables([t for i in range(listed.items.num_rows)
                              for t in npz_source.read_npz_member(listed.items.slice(i, 1))])
    rows = _decode(items, listed.label_names)
    bad = [r for r in rows if r["_error_type"]]
    assert [(r["_error_type"], r["_stage"]) for r in bad] == [("too_large", "list")]
    assert bad[0]["source_uri"] == f"{path}#train_images"
    assert sum(1 for r in rows if not r["_error_type"]) == 4


def test_a_member_that_grew_past_the_bound_after_listing_is_refused_unread(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.zeros(3))
    listed = npz_source.npz_listing(str(path), ["a"], max_pixels=1000)
    npz_bomb(path, side=40_000, real=False)  # swapped for a bomb between listing and reading
    member = listed.items.slice(0, 1)
    tables = list(npz_source.read_npz_member(member))
    assert [t.column("error_type").to_pylist() for t in tables] == [["too_large"]]


def test_images_over_the_byte_bound_are_refused_too():
    shape, dtype = (5, 4000, 4000, 3), np.dtype(np.float64)  # 16 Mpx, 384 MB an image
    assert npz_source.image_bound(shape, dtype, max_pixels=50_000_000) is not None
    assert npz_source.image_bound(shape, np.dtype(np.uint8), max_pixels=50_000_000) is None
    assert "pixels" in npz_source.image_bound((1, 200, 200), np.dtype(np.uint8), 1000)
    assert npz_source.row_bytes(shape, dtype) > max_input_bytes(50_000_000)


def test_rows_are_read_in_chunks_of_bounded_bytes(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, train_images=np.zeros((20, 1500, 1500), np.uint8),
             train_labels=np.arange(20) % 2)
    listed = npz_source.npz_listing(str(path), None)
    tables = list(npz_source.read_npz_member(listed.items))
    per = npz_source.CHUNK_BYTES // (1500 * 1500)
    assert [t.num_rows for t in tables] == [per] * (20 // per) + ([20 % per] if 20 % per else [])
    rows = _decode(pa.concat_tables(tables), listed.label_names)
    assert [r["labels"] for r in rows] == [[str(i % 2)] for i in range(20)]  # pairs kept


def test_a_label_array_too_wide_to_be_labels_is_refused(tmp_path):
    path = tmp_path / "wide.npz"
    np.savez(path, train_images=np.zeros((2, 4, 4), np.uint8),
             train_labels=np.zeros((2, npz_source.MAX_LABEL_VALUES + 1)))
    with pytest.raises(ConfigError, match="not a label array"):
        npz_source.npz_listing(str(path), None)


def test_staging_an_npz_bomb_ends_with_an_errors_row_in_bounded_memory(tmp_path, monkeypatch):
    path = npz_bomb(tmp_path / "bomb.npz", side=20_000)  # 400 MB of zeros inflated
    tracemalloc.start()
    try:
        res = stage_inline(monkeypatch, source=str(path), dataset="bomb",
                           lake=str(tmp_path / "lake"), max_pixels=1_000_000, max_errors="1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (res["images"], res["errors"]) == (4, 1)
    assert peak < 64 * 2**20, f"staging the bomb allocated {peak / 2**20:.0f} MiB"
    errors = Path(tmp_path / "lake").glob("datasets/bomb/1/errors/*.parquet")
    table = pa.concat_tables([pq.read_table(p) for p in errors])
    assert table.column("error_type").to_pylist() == ["too_large"]

