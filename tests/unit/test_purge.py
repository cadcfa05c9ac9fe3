"""Deleting dataset versions and tracing DICOM pseudonyms back, without Ray: ``datasets
delete`` removes a version and the files no other version lists; ``datasets errors --reveal``
and ``datasets reveal`` read the private linkage (0600) the stage job wrote (issue #13)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medray.cluster.stage import purge
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, NotFoundError
from tests.support.staging import stage_inline, version_rows
from tests.unit.test_restage import _png


def _stage(monkeypatch, src: Path, lake: Path, **kw) -> dict:
    return stage_inline(monkeypatch, source=str(src), dataset="d", lake=str(lake), **kw)


def test_delete_removes_a_version_and_only_the_files_no_other_version_lists(tmp_path,
                                                                            monkeypatch):
    src, lake = tmp_path / "src", tmp_path / "lake"
    for i in range(6):
        _png(src / "a" / f"{i}.png", i)
    _stage(monkeypatch, src, lake)
    _stage(monkeypatch, src, lake)  # v2 lists v1's shards as they are
    res = purge.delete_version(Lake(str(lake)), "d:1")
    assert res["kept_files"] and all("/1/shards/" in p for p in res["kept_files"])
    assert not (lake / "datasets/d/1/manifest.json").exists()
    v2 = json.loads((lake / "datasets/d/2/manifest.json").read_text())
    assert len(version_rows(lake, v2)) == 6  # still readable
    _stage(monkeypatch, src, lake, reuse=False)  # v3: its own shards
    res = purge.delete_version(Lake(str(lake)), "d:2")
    assert res["kept_files"] == [] and not (lake / "datasets/d/2").exists()
    with pytest.raises(ConfigError, match="name the version"):
        purge.delete_version(Lake(str(lake)), "d")
    with pytest.raises(NotFoundError):
        purge.delete_version(Lake(str(lake)), "d:2")


def test_delete_waits_for_a_staging_in_progress(tmp_path, monkeypatch):
    src, lake = tmp_path / "src", tmp_path / "lake"
    _png(src / "a" / "0.png", 0)
    _stage(monkeypatch, src, lake)
    marker = lake / "datasets/d/2/_staging.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    with pytest.raises(ConfigError, match="being staged"):
        purge.delete_version(Lake(str(lake)), "d:1")
    assert purge.delete_version(Lake(str(lake)), "d:1", force=True)["version"] == 1


def test_dicom_paths_are_pseudonyms_in_the_lake_and_revealed_from_the_linkage(tmp_path,
                                                                              monkeypatch):
    export, lake = tmp_path / "export", tmp_path / "lake"
    src = export / "DOE^JANE_MRN123"
    src.mkdir(parents=True)
    ok = src / "20240101_ok.dcm"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(ok)
    shutil.copy(get_testdata_file("rtplan.dcm"), src / "20240101_plan.dcm")  # no pixels
    res = _stage(monkeypatch, export, lake, max_errors="1")
    assert (res["images"], res["errors"]) == (1, 1)
    lake_bytes = b"".join(p.read_bytes() for p in lake.rglob("*") if p.is_file())
    assert b"MRN123" not in lake_bytes and b"20240101_" not in lake_bytes
    rows = purge.errors(Lake(str(lake)), "d:1")
    assert rows[0]["source_uri"].startswith("dicom:")
    revealed = purge.errors(Lake(str(lake)), "d:1", reveal=True,
                            linkage_uri=f"{lake}-linkage")
    assert revealed[0]["source_uri"] == str(src / "20240101_plan.dcm")
    staged = next(iter(version_rows(lake, json.loads(
        (lake / "datasets/d/1/manifest.json").read_text())).values()))
    assert purge.reveal(Lake(str(lake)), "d:1", [staged["source_uri"], "dicom:nope"],
                        linkage_uri=f"{lake}-linkage") == {staged["source_uri"]: str(ok),
                                                           "dicom:nope": None}
    parts = list(Path(f"{lake}-linkage").rglob("*.parquet"))
    assert parts and all(p.stat().st_mode & 0o777 == 0o600 for p in parts)
    again = _stage(monkeypatch, export, lake, max_errors="1")
    assert again["reused_images"] == 1  # a pseudonymised source is still the same source
    _stage(monkeypatch, src, lake, max_errors="1")  # the patient's own folder as the source
    manifest = json.loads((lake / "datasets/d/3/manifest.json").read_text())
    assert manifest["source"].startswith("dicom:") and "MRN123" not in json.dumps(manifest)
    with pytest.raises(NotFoundError, match="no linkage"):
        purge.errors(Lake(str(lake)), "d:1", reveal=True, linkage_uri=str(tmp_path / "none"))


def test_an_internal_error_on_a_dicom_names_neither_its_path_in_rows_nor_in_the_log(
        tmp_path, monkeypatch, caplog):
    from medray.cluster.stage import listing, remote
    from medray.workers.specs import StageSpec

    path = tmp_path / "DOE^JANE_MRN77" / "scan.dcm"
    path.parent.mkdir()
    pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(path)

    def bug(*args, **kwargs):
        raise KeyError(str(path))  # a bug whose message quotes the path

    monkeypatch.setattr(remote, "decode_image", bug)
    decoder = remote.BatchDecoder(StageSpec(source=str(tmp_path), dataset="d"),
                                  remote.DecodeOptions(fmt="dicom"))
    row = decoder(listing.items_table(listing.folder_items(str(tmp_path)).items)).to_pylist()[0]
    assert row["_error_type"] == "internal_error" and row["_raw_uri"] == str(path)
    assert "MRN77" not in row["source_uri"] + row["_error_message"]
    assert "MRN77" not in caplog.text and "internal error" in caplog.text
