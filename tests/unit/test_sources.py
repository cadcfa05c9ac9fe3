"""Staging sources without Ray: listing rules, CSV manifests, splits, the batch decoder and the
shard writer, on real files in a temporary folder."""

from __future__ import annotations

import functools
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medray.cluster.stage import csv_source, listing, npz_source, pipeline, remote, sources
from medray.cluster.stage.writer import ShardWriter
from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, NotFoundError
from medray.workers.shards import SHARD_SCHEMA, split_for
from medray.workers.specs import StageSpec
from tests.support.data import bomb_png


def _png(path: Path, value: int = 0, size: int = 16, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path


def _rel(items: list[dict], root: Path) -> dict[str, dict]:
    return {it["uri"][len(str(root)) + 1:]: it for it in items}


def _spec(source: str = "/src", **kw) -> StageSpec:
    return StageSpec(source=source, dataset="d", **kw)


def _decode(items: list[dict], label_names: tuple[str, ...] = (), multi_label: bool = False,
            known: np.ndarray | None = None, **spec) -> list[dict]:
    options = remote.DecodeOptions(label_names=tuple(label_names), multi_label=multi_label,
                                   known=known)
    decoder = remote.BatchDecoder(_spec(image_size=16, **spec), options)
    return decoder(listing.items_table(items)).to_pylist()


# ---------------------------------------------------------------------------- folder listing
def test_label_folders_hidden_sidecars_and_stray_files(tmp_path):
    _png(tmp_path / "NORMAL" / "a.png")
    _png(tmp_path / "PNEUMONIA" / "b.jpeg")
    _png(tmp_path / "PNEUMONIA" / "sub" / "c.png")  # deeper: still the top folder's label
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.png").write_bytes(b"x")
    (tmp_path / "NORMAL" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "README.md").write_text("about")
    (tmp_path / "NORMAL" / "notes.txt").write_text("x")
    (tmp_path / "NORMAL" / "scan.nii").write_bytes(b"x")
    _png(tmp_path / "stray.png")
    tree = listing.folder_items(str(tmp_path))
    assert tree.format == "folder" and not tree.has_splits
    by = _rel(tree.items, tmp_path)
    assert set(by) == {"NORMAL/a.png", "PNEUMONIA/b.jpeg", "PNEUMONIA/sub/c.png",
                       "NORMAL/scan.nii", "stray.png"}
    assert by["NORMAL/a.png"]["labels"] == ["NORMAL"]
    assert by["PNEUMONIA/sub/c.png"]["labels"] == ["PNEUMONIA"]
    assert by["NORMAL/scan.nii"]["error_type"] == "unsupported"
    assert by["stray.png"]["error_type"] == "no_label"
    assert not by["NORMAL/a.png"].get("error_type")
    assert sorted(tree.skipped) == ["NORMAL/notes.txt", "README.md"]


def test_top_level_split_folders_are_splits(tmp_path):
    for split, label in [("train", "cat"), ("val", "cat"), ("test", "dog")]:
        _png(tmp_path / split / label / f"{split}.png")
    tree = listing.folder_items(str(tmp_path))
    assert tree.has_splits
    got = {tuple(it["labels"]): it["split"] for it in tree.items}
    assert {it["split"] for it in tree.items} == {"train", "val", "test"}
    assert got[("dog",)] == "test"


def test_a_class_named_test_beside_others_is_a_label(tmp_path):
    _png(tmp_path / "test" / "a.png")
    _png(tmp_path / "other" / "b.png")
    tree = listing.folder_items(str(tmp_path))
    assert not tree.has_splits
    assert {it["labels"][0] for it in tree.items} == {"test", "other"}
    assert all(it["split"] is None for it in tree.items)


def test_flat_folder_stages_with_unknown_labels(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", 1)
    items = listing.folder_items(str(tmp_path)).items
    assert [it["labels"] for it in items] == [None, None]
    assert not any(it.get("error_type") for it in items)


def test_label_names_flag_rejects_other_folders(tmp_path):
    _png(tmp_path / "a" / "1.png")
    _png(tmp_path / "b" / "2.png")
    items = listing.folder_items(str(tmp_path), label_names=["a"]).items
    assert [it.get("error_type") for it in _rel(items, tmp_path).values()] == [
        None, "unknown_label"]


def test_symlink_loops_are_not_followed_and_fifos_left_out(tmp_path):
    _png(tmp_path / "a" / "x.png")
    os.symlink("..", tmp_path / "a" / "loop")
    os.mkfifo(tmp_path / "a" / "pipe.png")  # reading it would block forever
    os.symlink("nowhere.png", tmp_path / "a" / "dangling.png")
    items = listing.folder_items(str(tmp_path)).items
    by = _rel(items, tmp_path)
    assert set(by) == {"a/x.png", "a/dangling.png"}
    assert by["a/dangling.png"]["error_type"] == "unreadable"


def test_a_file_swapped_for_a_fifo_after_listing_does_not_block(tmp_path):
    path = _png(tmp_path / "a" / "x.png")
    items = listing.folder_items(str(tmp_path)).items
    path.unlink()
    os.mkfifo(path)  # no writer: a blocking open or read would wait forever
    row = _decode(items)[0]
    assert row["_error_type"] == "unreadable" and row["_stage"] == "read"


def test_dicom_folders_are_detected_and_deep_trees_give_no_labels(tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    for rel in ("p1/study/series/1.dcm", "p1/study/series/2.dcm", "p2/s/t/3"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(Path(ct).read_bytes())
    tree = listing.folder_items(str(tmp_path))
    assert tree.format == "dicom"
    items = tree.items
    assert len(items) == 3
    # patient/study/series folders are not labels (their names can be identifying)
    assert all(it["labels"] is None and not it.get("error_type") for it in items)
    listed = sources.list_source(_spec(str(tmp_path)))
    assert listed.format == "dicom" and listed.label_names == []


def test_dicom_label_folders_give_labels(tmp_path):
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    for rel in ("ct/a.dcm", "mr/b.dcm"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(ct)
    tree = listing.folder_items(str(tmp_path))
    assert tree.format == "dicom"
    assert sorted(it["labels"][0] for it in tree.items) == ["ct", "mr"]


def test_a_single_dicom_file_is_a_source(tmp_path):
    path = tmp_path / "one.dcm"
    path.write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    listed = sources.list_source(_spec(str(path)))
    assert listed.format == "dicom" and listed.inputs == 1
    assert listed.items.column("uri").to_pylist() == [str(path)]
    assert listed.items.column("labels").to_pylist() == [None]


def test_detect_format_by_name_and_missing_source(tmp_path):
    assert listing.detect_format(str(tmp_path / "x.npz")) == "npz"
    assert listing.detect_format(str(tmp_path / "Data_Entry_2017.csv")) == "csv"
    assert listing.detect_format(str(tmp_path / "a.tsv")) == "csv"
    assert listing.detect_format(str(tmp_path / "a.dcm")) == "dicom"
    with pytest.raises(NotFoundError, match="source not found"):
        listing.detect_format(str(tmp_path / "nothing"))
    (tmp_path / "scan.nii").write_bytes(b"x")
    with pytest.raises(ConfigError, match="pass --format"):
        listing.detect_format(str(tmp_path / "scan.nii"))


# ---------------------------------------------------------------------------- CSV manifests
def test_parse_labels_separator_and_no_finding():
    assert csv_source.parse_labels("Effusion|Atelectasis", "|", "No Finding") == [
        "Atelectasis", "Effusion"]
    assert csv_source.parse_labels("No Finding", "|", "No Finding") == []
    assert csv_source.parse_labels(" Mass ", "|", "No Finding") == ["Mass"]
    assert csv_source.parse_labels("", "|", "No Finding") is None
    assert csv_source.parse_labels("a;b", ";", None) == ["a", "b"]


@pytest.mark.parametrize("rel", ["../../etc/passwd", "/etc/passwd", "a/../../x.png",
                                 "C:\\images\\x.png", "s3://other/x.png", ""])
def test_resolve_under_refuses_paths_that_leave_the_root(rel):
    assert csv_source.resolve_under("/data/images", rel) is None


def test_resolve_under_keeps_paths_inside():
    assert csv_source.resolve_under("/data/images", "a/./b/../x.png") == "/data/images/a/x.png"
    assert csv_source.resolve_under("bucket/prefix", "x.png") == "bucket/prefix/x.png"
    assert csv_source.resolve_under("/data/images", "sub\\x.png") == "/data/images/sub/x.png"


def _chestxray(tmp_path: Path) -> Path:
    root = tmp_path / "cxr"
    _png(root / "images_001" / "images" / "00000001_000.png", 1)
    _png(root / "images_001" / "images" / "00000001_001.png", 2)
    _png(root / "images_002" / "images" / "00000002_000.png", 3)
    _png(root / "dup_a" / "same.png", 4)
    _png(root / "dup_b" / "same.png", 5)
    (tmp_path / "secret.png").write_bytes(b"outside")
    (root / "Data_Entry_2017.csv").write_text(
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age\n"
        "00000001_000.png,Cardiomegaly|Emphysema,0,1,58\n"
        "00000001_001.png,No Finding,1,1,58\n"
        "images_002/images/00000002_000.png,Hernia,0,2,81\n"
        "../secret.png,Hernia,0,3,30\n"
        "/etc/passwd,Hernia,0,3,30\n"
        "../../etc/passwd,Hernia,0,3,30\n"
        "00000009_000.png,Mass,0,9,40\n"
        "same.png,Mass,0,4,40\n"
        "00000002_000.png,,0,2,81\n")
    return root


def test_csv_manifest_like_chestxray14(tmp_path):
    root = _chestxray(tmp_path)
    items = csv_source.csv_items(_spec(str(root / "Data_Entry_2017.csv")))
    assert len(items) == 9
    first, second, third, up, absolute, passwd, missing, ambiguous, unlabeled = items
    assert first["uri"].endswith("images_001/images/00000001_000.png")  # found by name
    assert first["labels"] == ["Cardiomegaly", "Emphysema"] and not first.get("error_type")
    assert second["labels"] == [] and second["patient_key"] == first["patient_key"] == "csv:1"
    assert third["labels"] == ["Hernia"] and not third.get("error_type")
    for bad in (up, absolute, passwd):
        assert bad["error_type"] == "unsafe_path"
        assert "secret" not in bad["uri"] and not bad["uri"].startswith("/etc")
    assert missing["error_type"] == "missing"
    assert ambiguous["error_type"] == "ambiguous_path"
    assert unlabeled["labels"] is None and not unlabeled.get("error_type")


def test_csv_images_root_tsv_and_bad_columns(tmp_path):
    images = tmp_path / "imgs"
    _png(images / "x.png")
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("file\tfinding\nx.png\tA;B\n")
    items = csv_source.csv_items(_spec(str(tsv), path_column="file", label_column="finding",
                                       label_sep=";", images_root=str(images)))
    assert items[0]["labels"] == ["A", "B"] and not items[0].get("error_type")
    assert items[0]["patient_key"] == "name:x"  # no patient column: file name grouping
    with pytest.raises(ConfigError, match="did you mean 'finding'"):
        csv_source.csv_items(_spec(str(tsv), path_column="file", label_column="findings",
                                   images_root=str(images)))
    with pytest.raises(ConfigError, match="patient column 'pid'"):
        csv_source.csv_items(_spec(str(tsv), path_column="file", label_column="finding",
                                   patient_column="pid", images_root=str(images)))


def test_csv_single_label_column_is_not_multi_label(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", 1)
    (tmp_path / "m.csv").write_text("path,label\na.png,cat\nb.png,dog\n")
    spec = _spec(str(tmp_path / "m.csv"), path_column="path", label_column="label",
                 patient_column=None)
    listed = sources.list_source(spec)
    assert listed.format == "csv" and not listed.multi_label
    assert listed.label_names == ["cat", "dog"]


# ---------------------------------------------------------------------------- splits
def test_split_is_deterministic_by_patient_key():
    keys = [f"csv:{i}" for i in range(400)]
    first = [remote.raw_split(None, k, 20, 20) for k in keys]
    assert first == [remote.raw_split(None, k, 20, 20) for k in keys]
    assert set(first) == {"train", "val", "test"}
    assert remote.raw_split("test", "csv:1", 20, 20) == "test"  # the source's split wins
    shares = {s: first.count(s) / len(first) for s in set(first)}
    assert 0.1 < shares["val"] < 0.3 and 0.1 < shares["test"] < 0.3


def test_nohash_files_of_one_subject_share_a_split(tmp_path):
    # retrain.py: 'x_nohash_N' names one subject, whatever the label folder
    for i in range(40):
        _png(tmp_path / "yes" / f"spk{i}_nohash_0.png", i)
        _png(tmp_path / "no" / f"spk{i}_nohash_1.png", 100 + i)
    items = listing.folder_items(str(tmp_path)).items
    rows = _decode(items, val_percent=30.0, test_percent=30.0)
    by_subject: dict[str, set[str]] = {}
    for row in rows:
        subject = Path(row["source_uri"]).name.split("_nohash_")[0]
        by_subject.setdefault(subject, set()).add(row["split"])
    assert all(len(s) == 1 for s in by_subject.values())
    assert {s for v in by_subject.values() for s in v} == {"train", "val", "test"}


def _dicom_with(base: str, path: Path, **attrs) -> Path:
    ds = pydicom.dcmread(get_testdata_file(base))
    for key, value in attrs.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def test_dicom_patient_id_groups_splits_and_is_never_stored(tmp_path):
    files = []
    for p in range(30):
        for k in range(2):
            files.append(_dicom_with("MR_small.dcm", tmp_path / f"f{p}_{k}.dcm",
                                     PatientID=f"ZZPID{p:04d}", InstanceNumber=k + 1))
    items = listing.folder_items(str(tmp_path)).items
    rows = _decode(items, val_percent=30.0, test_percent=30.0)
    assert not any(r["_error_type"] for r in rows)
    by_patient: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        assert r["source_uri"].startswith("dicom:") and "ZZPID" not in r["source_uri"]
        pid = Path(r["_raw_uri"]).stem.split("_")[0]
        by_patient.setdefault(pid, set()).add((r["split"], r["patient_key"]))
    assert all(len(v) == 1 for v in by_patient.values())  # one split and one key a patient
    assert len({next(iter(v))[1] for v in by_patient.values()}) == 30
    assert not any("ZZPID" in (r["patient_key"] or "") or "ZZPID" in (r["metadata"] or "")
                   for r in rows)
    meta = rows[0]["metadata"]
    assert '"modality": "MR"' in meta and '"rows": 64' in meta


# ---------------------------------------------------------------------------- decoding
def test_bad_inputs_become_error_rows(tmp_path):
    good = _png(tmp_path / "l" / "good.png")
    (tmp_path / "l" / "empty.png").write_bytes(b"")
    full = _png(tmp_path / "l" / "big.png", 7, size=64).read_bytes()
    (tmp_path / "l" / "truncated.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "l" / "text.jpg").write_text("this is not an image at all")
    bomb_png(tmp_path / "l" / "bomb.png")
    rtdose = Path(get_testdata_file("rtdose.dcm")).read_bytes()  # 15 frames
    (tmp_path / "l" / "cine.dcm").write_bytes(rtdose)
    items = listing.folder_items(str(tmp_path)).items
    rows = {Path(r["_raw_uri"] or r["source_uri"]).name: r for r in _decode(items)}
    assert rows["cine.dcm"]["source_uri"].startswith("dicom:")  # a DICOM path: a pseudonym
    assert rows["good.png"]["_error_type"] is None
    assert rows["good.png"]["image_id"] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert len(rows["good.png"]["pixels"]) == 16 * 16
    expected = {"empty.png": "empty", "truncated.png": "truncated", "text.jpg": "not_an_image",
                "bomb.png": "too_large", "cine.dcm": "multi_frame", "big.png": None}
    assert {k: rows[k]["_error_type"] for k in expected} == expected
    assert all(rows[k]["_error_message"] for k, v in expected.items() if v)


def test_oversized_file_is_refused_before_reading(tmp_path):
    big = tmp_path / "a" / "huge.png"
    big.parent.mkdir()
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 2_000_000)
    items = listing.folder_items(str(tmp_path)).items
    max_pixels = 1000
    assert remote.max_file_bytes(max_pixels) < 2_000_000 + remote.max_file_bytes(0)
    items[0]["size"] = remote.max_file_bytes(max_pixels) + 1
    row = _decode(items, max_pixels=max_pixels)[0]
    assert row["_error_type"] == "too_large" and row["_stage"] == "read"


def test_known_images_are_not_decoded_again(tmp_path):
    a = _png(tmp_path / "l" / "a.png", 1)
    _png(tmp_path / "l" / "b.png", 2)
    known = np.sort(np.array([hashlib.sha256(a.read_bytes()).digest()], dtype="S32"))
    items = listing.folder_items(str(tmp_path)).items
    rows = {Path(r["source_uri"]).name: r for r in _decode(items, known=known)}
    assert rows["a.png"]["_known"] and rows["a.png"]["pixels"] == b""
    assert not rows["b.png"]["_known"] and len(rows["b.png"]["pixels"]) == 256


def test_keep_original_stores_deidentified_dicom(tmp_path):
    path = _dicom_with("CT_small.dcm", tmp_path / "x" / "a.dcm", PatientName="ZZNAME^PHI",
                       InstitutionName="ZZ PHI HOSPITAL", AccessionNumber="ZZACC991")
    row = _decode(listing.folder_items(str(tmp_path)).items, keep_original=True)[0]
    assert row["_error_type"] is None
    assert row["image_id"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for marker in (b"ZZNAME", b"ZZ PHI HOSPITAL", b"ZZACC991", b"1CT1", b"20040119"):
        assert marker not in row["original"]
    ds = pydicom.dcmread(io.BytesIO(row["original"]))
    assert ds.PatientIdentityRemoved == "YES" and ds.Rows == 128


# ---------------------------------------------------------------------------- npz
def test_npz_is_streamed_with_labels_and_splits(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mini.npz"
    np.savez_compressed(path, train_images=rng.integers(0, 255, (700, 8, 8), dtype=np.uint8),
                        train_labels=rng.integers(0, 3, (700, 1)),
                        test_images=rng.integers(0, 255, (5, 8, 8), dtype=np.uint8),
                        test_labels=np.array([[0], [1], [2], [1], [7]]))
    listed = npz_source.npz_listing(str(path), ["a", "b", "c", "d", "e", "f", "g", "h"])
    names = listed.label_names
    assert listed.inputs == 705 and not listed.multi_label and listed.has_splits
    assert listed.items.num_rows == 2
    tables = list(npz_source.read_npz_member(listed.items))
    assert [t.num_rows for t in tables] == [5, 512, 188]  # test first (sorted), then chunks
    rows = _decode(pa.concat_tables(tables).to_pylist(), label_names=names)
    assert [r["split"] for r in rows[:5]] == ["test"] * 5
    assert [r["labels"] for r in rows[:5]] == [["a"], ["b"], ["c"], ["b"], ["h"]]
    d = np.load(path)
    np.testing.assert_array_equal(
        np.frombuffer(rows[5]["pixels"], np.uint8).reshape(16, 16)[::2, ::2].shape, (8, 8))
    assert rows[5]["source_uri"].endswith("#train_images/0")
    assert rows[5]["labels"] == [names[int(d["train_labels"][0, 0])]]
    with pytest.raises(ConfigError, match="3 names"):
        npz_source.npz_listing(str(path), ["a", "b", "c"])


def test_npz_multi_label(tmp_path):
    path = tmp_path / "chest.npz"
    np.savez(path, val_images=np.zeros((3, 4, 4), np.uint8),
             val_labels=np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0]]))
    listed = npz_source.npz_listing(str(path), None)
    names = listed.label_names
    assert listed.multi_label and names == ["0", "1", "2"]
    table = pa.concat_tables(list(npz_source.read_npz_member(listed.items)))
    rows = _decode(table.to_pylist(), label_names=names, multi_label=True)
    assert [r["labels"] for r in rows] == [["0", "2"], [], ["1"]]


# ---------------------------------------------------------------------------- shard writer
def _rows(n: int, seed: int = 0, side: int = 64) -> pa.Table:
    rng = np.random.default_rng(seed)
    pix = [rng.integers(0, 40, side * side, dtype=np.uint8).tobytes() for _ in range(n)]
    return pa.Table.from_pydict({
        "image_id": [hashlib.sha256(p).hexdigest() for p in pix],
        "source_uri": [f"/x/{seed}-{i}.png" for i in range(n)],
        "labels": [["a"]] * n, "patient_key": [None] * n, "split": ["train"] * n,
        "height": [side] * n, "width": [side] * n, "channels": [1] * n, "pixels": pix,
        "orig_height": [side] * n, "orig_width": [side] * n, "format": ["png"] * n,
        "metadata": [None] * n, "original": [None] * n}, schema=SHARD_SCHEMA)


def test_shard_writer_balances_and_checksums(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    target = 200_000
    writer = ShardWriter(lake, functools.partial(layout.shard, "d", 1), "t", target)
    batches = [_rows(50, s) for s in range(20)]
    total = sum(b.nbytes for b in batches)
    for i, b in enumerate(batches):
        writer.add(b, more_bytes=sum(x.nbytes for x in batches[i + 1:]))
    shards = writer.close()
    assert sum(s["rows"] for s in shards) == 1000
    sizes = [s["bytes"] for s in shards]
    assert len(shards) >= 3
    assert max(sizes) <= 1.35 * target and min(sizes) >= 0.6 * max(sizes)  # balanced
    for s in shards:
        data = (tmp_path / "lake" / s["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        meta = pq.ParquetFile(io.BytesIO(data)).metadata
        assert meta.num_rows == s["rows"]
        assert meta.row_group(0).column(0).compression == "ZSTD"
    ids = pa.concat_tables([lake.read_parquet(s["path"]) for s in shards]).column("image_id")
    assert ids.to_pylist() == pa.concat_tables(batches).column("image_id").to_pylist()
    assert total > 0


def test_shard_writer_merges_a_small_tail(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    writer = ShardWriter(lake, functools.partial(layout.shard, "d", 1), "t", 150_000)
    # the caller expected far more rows than came: without the merge the tail would be tiny
    for s in range(8):
        writer.add(_rows(50, s), more_bytes=10_000_000)
    writer.add(_rows(2, 99), more_bytes=0)
    shards = writer.close()
    rows = [s["rows"] for s in shards]
    assert sum(rows) == 402 and min(rows) > 20
    assert len(lake.list_files("datasets/d/1/shards")) == len(shards)


def test_items_per_block_balances_size_and_workers():
    row = 128 * 128 + 512  # a gray 128 px image
    # 2000 images on 2 workers: 16 blocks (8 per worker), not 63 tiny ones of a batch each
    assert pipeline.items_per_block(2_000, 32, 2, row) == 125
    # 20000 images: blocks of about BLOCK_BYTES of output, so memory does not grow with them
    assert pipeline.items_per_block(20_000, 32, 2, row) == pipeline.BLOCK_BYTES // row
    assert pipeline.items_per_block(200_000, 32, 2, row) == pipeline.BLOCK_BYTES // row
    # large rows (kept originals): about BLOCK_BYTES of output per block, never under a batch
    assert pipeline.items_per_block(20_000, 8, 2, 1e6) == pipeline.BLOCK_BYTES // 1e6
    assert pipeline.items_per_block(20_000, 64, 2, 1e7) == 64
    assert pipeline.items_per_block(10, 32, 2, 100) == 32  # a tiny job: one block


def test_chunks_cover_the_listing_in_order_and_start_small():
    bounds = pipeline.chunk_bounds(1_000, 300, 32, 2)
    # the first chunks (two per decoder) are one decoding batch: the first rows come back soon
    assert bounds[:4] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert bounds[4:] == [(128, 428), (428, 728), (728, 1000)]
    assert pipeline.chunk_bounds(20, 300, 32, 2) == [(0, 20)]
    assert pipeline.chunk_bounds(0, 300, 32, 2) == []


def test_decoded_chunks_come_back_in_order_with_a_bounded_queue(monkeypatch):
    import ray

    calls: list[tuple[int, int]] = []  # (decoder, chunk), in the order they were sent
    waiting: set[int] = set()

    class Decoder:
        def __init__(self, index: int) -> None:
            self.index = index
            self.decode = self  # stands in for the actor method handle

        def remote(self, chunk: int) -> int:
            calls.append((self.index, chunk))
            waiting.add(chunk)
            assert len(waiting) <= pipeline.IN_FLIGHT * 2  # never more queued than the bound
            return chunk

    def get(ref: int) -> str:
        waiting.discard(ref)
        return f"decoded {ref}"

    monkeypatch.setattr(ray, "get", get)
    out = list(pipeline._in_order([Decoder(0), Decoder(1)], range(7)))
    assert out == [f"decoded {i}" for i in range(7)]
    # filled two deep each, then each new chunk to the decoder whose result just came back
    assert calls == [(0, 0), (1, 1), (0, 2), (1, 3), (0, 4), (1, 5), (0, 6)]


def test_a_decoder_chunk_is_its_batches_in_order(tmp_path):
    for i in range(5):
        _png(tmp_path / "a" / f"{i}.png", i)
    items = listing.folder_items(str(tmp_path)).table
    decoder = remote.BatchDecoder(_spec(image_size=8, decode_batch=2), remote.DecodeOptions())
    whole = decoder.decode(items)  # three batches of at most 2
    assert whole.to_pylist() == [r for i in range(0, 5, 2)
                                 for r in decoder(items.slice(i, 2)).to_pylist()]
    assert [u.rsplit("/", 1)[1] for u in whole.column("source_uri").to_pylist()] == [
        f"{i}.png" for i in range(5)]


def test_a_large_listing_is_built_in_chunks_in_order(tmp_path):
    for i in range(7):
        (tmp_path / "a" / f"{i:02d}.png").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / f"{i:02d}.png").write_bytes(b"x")
    builder = listing.ItemsBuilder(chunk=3)
    for it in listing.folder_items(str(tmp_path)).items:
        builder.add(it)
    assert len(builder.chunks) == 2 and builder.pending == 1  # two chunks in Arrow already
    table = builder.table()
    assert [u.rsplit("/", 1)[1] for u in table.column("uri").to_pylist()] == [
        f"{i:02d}.png" for i in range(7)]
    assert table.schema == listing.ITEM_SCHEMA and table.column("uri").num_chunks == 3


def test_split_for_matches_the_shared_rule():
    # the decoder's split must be the lake-wide rule, so other tools can recompute it
    assert remote.raw_split(None, "csv:7", 10, 10) == split_for("csv:7", 10, 10)
