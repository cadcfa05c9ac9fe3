"""Re-staging every kind of source (folder tree, folder with split folders, CSV manifest, .npz,
DICOM folder) twice, then grown, with the real stage job (reuse, shard writer, manifest) and the
decoder called inline instead of through Ray: row for row, a version made by reuse says what a
fresh staging says (ids, labels, split, patient key, path, pixels), and when the source moves an
image to another split or patient, the new version follows it and counts the move.

Issue #14: re-staging the same .npz made a version whose reused rows had all lost their labels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from tests.support.staging import stage_inline, version_rows

FIELDS = ("labels", "split", "patient_key", "source_uri", "pixels", "format")


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12), dtype=np.uint8)
                    ).save(path)


def _dicom(path: Path, seed: int, patient: str) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientID = patient
    ds.InstanceNumber = seed  # other bytes: another image
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)


def _npz(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)  # the same first rows however many: a grown file
    images = rng.integers(0, 256, (60, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 2, (60, 1))
    tr = n * 2 // 3
    np.savez(path, train_images=images[:tr], train_labels=labels[:tr],
             test_images=images[40:40 + n - tr], test_labels=labels[40:40 + n - tr])


def _folder(root: Path, n: int, splits: bool) -> None:
    for i in range(n):
        top = (["train", "val", "test"][i % 3] + "/") if splits else ""
        _png(root / f"{top}{'ab'[i % 2]}" / f"img{i:03d}.png", i)


def _csv(root: Path, n: int) -> None:
    lines = ["Image Index,Finding Labels,Patient ID"]
    for i in range(n):
        _png(root / "images" / f"{i:05d}.png", 1000 + i)
        lines.append(f"{i:05d}.png,{['Mass', 'No Finding', 'Effusion|Mass'][i % 3]},p{i // 2}")
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")


def _dicoms(root: Path, n: int) -> None:
    for i in range(n):
        _dicom(root / f"s{i:03d}.dcm", i + 1, f"PAT{i // 3}")


KINDS: dict[str, tuple[Any, str]] = {
    "folder": (lambda root, n: _folder(root, n, splits=False), ""),
    "split_folders": (lambda root, n: _folder(root, n, splits=True), ""),
    "csv": (_csv, "Data_Entry_2017.csv"),
    "npz": (lambda root, n: _npz(root / "mnist.npz", n), "mnist.npz"),
    "dicom": (_dicoms, ""),
}


def _described(rows: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    return {iid: tuple(r[f] for f in FIELDS) for iid, r in rows.items()}


def _manifest(lake: Path, name: str, version: int) -> dict[str, Any]:
    return json.loads((lake / "datasets" / name / str(version) / "manifest.json").read_text())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_restaging_keeps_every_row_and_growing_adds_only_new_ones(kind, tmp_path, monkeypatch):
    make, rel = KINDS[kind]
    root, lake = tmp_path / "src", tmp_path / "lake"
    root.mkdir()
    make(root, 30)
    source = str(root / rel) if rel else str(root)
    opts: dict[str, Any] = {"source": source, "dataset": kind, "lake": str(lake),
                            "shard_mb": 0.002, "val_percent": 20.0, "test_percent": 20.0}
    if kind == "npz":
        opts["label_names"] = ["normal", "pneumonia"]
    first = stage_inline(monkeypatch, **opts)
    second = stage_inline(monkeypatch, **opts)
    v1, v2 = (version_rows(lake, _manifest(lake, kind, v)) for v in (1, 2))
    assert first["images"] == 30 == len(v1)
    assert second["reused_images"] == 30 and second["new_images"] == 0
    assert _described(v2) == _described(v1)  # row for row, nothing lost, nothing changed
    if kind != "dicom":  # a flat DICOM folder has no ground truth
        assert all(r["labels"] is not None for r in v1.values())
    assert _manifest(lake, kind, 2)["counts"] == _manifest(lake, kind, 1)["counts"]
    assert second["moved_images"] == second["rekeyed_images"] == 0
    make(root, 45)  # grown: the same 30 and 15 more
    third = stage_inline(monkeypatch, **opts)
    v3 = version_rows(lake, _manifest(lake, kind, 3))
    assert (third["images"], third["reused_images"], third["new_images"]) == (45, 30, 15)
    assert {i: d for i, d in _described(v3).items() if i in v1} == _described(v1)
    fresh = stage_inline(monkeypatch, **{**opts, "dataset": f"{kind}-fresh"})
    assert fresh["reused_images"] == 0
    assert _described(version_rows(lake, _manifest(lake, f"{kind}-fresh", 1))) == \
        _described(v3)  # what reuse made is what staging anew makes
    assert _manifest(lake, kind, 3)["counts"] == _manifest(lake, f"{kind}-fresh", 1)["counts"]


def test_an_image_moved_from_train_to_test_moves_in_the_new_version(tmp_path, monkeypatch):
    root, lake = tmp_path / "src", tmp_path / "lake"
    _folder(root, 12, splits=True)
    opts = {"source": str(root), "dataset": "moves", "lake": str(lake)}
    stage_inline(monkeypatch, **opts)
    moved = root / "train" / "a" / "img000.png"
    (root / "test" / "a").mkdir(parents=True, exist_ok=True)
    shutil.move(moved, root / "test" / "a" / "img000.png")
    res = stage_inline(monkeypatch, **opts)
    assert res["moved_images"] == 1 and res["reused_images"] == 12 and res["new_images"] == 0
    manifest = _manifest(lake, "moves", 2)
    assert manifest["moved_images"] == 1
    rows = version_rows(lake, manifest)
    by_name = {Path(r["source_uri"]).name: r for r in rows.values()}
    assert by_name["img000.png"]["split"] == "test"
    assert by_name["img000.png"]["source_uri"].endswith("/test/a/img000.png")
    assert sum(manifest["images_by_split"].values()) == 12
    assert manifest["images_by_split"]["test"] == 5  # 4 in test/ and the one moved there
    others = {k: v for k, v in by_name.items() if k != "img000.png"}
    old = {Path(r["source_uri"]).name: r for r in version_rows(
        lake, _manifest(lake, "moves", 1)).values()}
    assert all(old[k]["split"] == r["split"] for k, r in others.items())


def test_a_csv_patient_change_moves_the_key_and_its_split(tmp_path, monkeypatch):
    root, lake = tmp_path / "src", tmp_path / "lake"
    _csv(root, 40)
    opts = {"source": str(root / "Data_Entry_2017.csv"), "dataset": "rekey", "lake": str(lake),
            "val_percent": 30.0, "test_percent": 30.0}
    stage_inline(monkeypatch, **opts)
    v1 = {Path(r["source_uri"]).name: r for r in version_rows(
        lake, _manifest(lake, "rekey", 1)).values()}
    # image 00000 was filed under the wrong patient: it belongs with 00007's patient (p3)
    csv = root / "Data_Entry_2017.csv"
    csv.write_text(csv.read_text().replace("00000.png,Mass,p0", "00000.png,Mass,p3"))
    res = stage_inline(monkeypatch, **opts)
    assert res["rekeyed_images"] == 1
    v2 = {Path(r["source_uri"]).name: r for r in version_rows(
        lake, _manifest(lake, "rekey", 2)).values()}
    assert v2["00000.png"]["patient_key"] == v1["00007.png"]["patient_key"]
    assert v2["00000.png"]["split"] == v1["00007.png"]["split"]  # a patient keeps one split
    assert res["moved_images"] == int(v1["00000.png"]["split"] != v1["00007.png"]["split"])
    assert {k: r for k, r in v2.items() if k != "00000.png"} == \
        {k: r for k, r in v1.items() if k != "00000.png"}


def test_a_csv_split_column_is_followed_and_moves_too(tmp_path, monkeypatch):
    root, lake = tmp_path / "src", tmp_path / "lake"
    lines = ["Image Index,Finding Labels,Patient ID,Split"]
    for i in range(9):
        _png(root / f"{i}.png", 50 + i)
        lines.append(f"{i}.png,Mass,p{i},{['train', 'validation', 'TEST'][i % 3]}")
    lines.append("9.png,Mass,p9,holdout")  # not a split name: an error row
    _png(root / "9.png", 59)
    csv = root / "list.csv"
    csv.write_text("\n".join(lines) + "\n")
    opts = {"source": str(csv), "dataset": "csvsplit", "lake": str(lake),
            "split_column": "Split", "max_errors": "1"}
    res = stage_inline(monkeypatch, **opts)
    assert res["images"] == 9 and res["errors"] == 1
    manifest = _manifest(lake, "csvsplit", 1)
    assert manifest["splits_from_source"] and manifest["errors_by_type"] == {"bad_split": 1}
    assert manifest["images_by_split"] == {"test": 3, "train": 3, "val": 3}
    csv.write_text(csv.read_text().replace("0.png,Mass,p0,train", "0.png,Mass,p0,test"))
    res = stage_inline(monkeypatch, **opts)
    assert res["moved_images"] == 1
    rows = {Path(r["source_uri"]).name: r for r in version_rows(
        lake, _manifest(lake, "csvsplit", 2)).values()}
    assert rows["0.png"]["split"] == "test"
    assert _manifest(lake, "csvsplit", 2)["images_by_split"] == {"test": 4, "train": 2, "val": 3}


def test_the_version_is_claimed_before_anything_is_written_under_it(tmp_path, monkeypatch):
    from medray.cluster.store import catalog
    from medray.cluster.store.lake import Lake

    _folder(tmp_path / "src", 4, splits=False)
    events: list[str] = []
    claim = catalog.claim_version
    monkeypatch.setattr(catalog, "claim_version", lambda lake, name, **kw: events.append(
        "claim") or claim(lake, name, **kw))
    for method in ("write_bytes", "write_json", "write_parquet"):
        original = getattr(Lake, method)

        def spy(self, rel, *args, _original=original, **kwargs):
            events.append(rel)
            return _original(self, rel, *args, **kwargs)

        monkeypatch.setattr(Lake, method, spy)
    stage_inline(monkeypatch, source=str(tmp_path / "src"), dataset="claimed",
                 lake=str(tmp_path / "lake"))
    under = [e for e in events if e.startswith("datasets/claimed/1/")]
    assert events.index("claim") < events.index(under[0]), events


def test_two_stagings_of_one_name_at_once_get_two_versions(tmp_path, monkeypatch):
    import threading

    from medray.cluster.store.lake import Lake

    lake = tmp_path / "lake"
    for name, n in (("a", 5), ("b", 8)):
        for i in range(n):
            _png(tmp_path / name / "x" / f"{i}.png", 100 * n + i)
    both_chose = threading.Barrier(2, timeout=30)
    write_json = Lake.write_json

    def marker_together(self, rel, obj):  # the first write under a version: after both chose
        if rel.endswith("/_staging.json"):
            both_chose.wait()
        return write_json(self, rel, obj)

    monkeypatch.setattr(Lake, "write_json", marker_together)
    results: dict[str, dict] = {}
    failures: dict[str, BaseException] = {}

    def stage(name: str) -> None:
        try:
            results[name] = stage_inline(monkeypatch, source=str(tmp_path / name),
                                         dataset="race", lake=str(lake))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failures[name] = exc

    threads = [threading.Thread(target=stage, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures and set(results) == {"a", "b"}, failures
    assert sorted(r["version"] for r in results.values()) == [1, 2]
    for name, res in results.items():
        manifest = _manifest(lake, "race", res["version"])
        assert manifest["source"] == str(tmp_path / name)
        assert manifest["images"] == res["images"] == {"a": 5, "b": 8}[name]
        rows = version_rows(lake, manifest)
        assert {Path(r["source_uri"]).parent.parent.name for r in rows.values()} == {name}
