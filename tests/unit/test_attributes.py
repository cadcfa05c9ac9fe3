"""Patient attributes as typed shard columns (issue 15), without Ray: which CSV columns are
kept, how their values are typed, that identifying columns are refused, and that a manifest's
and a DICOM's attributes reach the decoder's rows as typed columns."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medray.cluster.stage import csv_source, listing, remote, sources
from medray.workers import attributes as at
from medray.workers.errors import ConfigError
from medray.workers.shards import SHARD_SCHEMA, shard_schema
from medray.workers.specs import StageSpec

COLUMNS = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
           "Patient Gender", "View Position", "Patient Name", "Accession Number"]


@pytest.mark.parametrize(("value", "years", "bad"), [
    (58, 58, False), ("58", 58, False), ("058Y", 58, False), (" 58.9 ", 58, False),
    ("006M", 0, False), ("010W", 0, False), ("003D", 0, False), ("018y", 18, False),
    ("95", 90, False), ("102Y", 90, False),       # HIPAA Safe Harbor: 90 or older
    ("", None, False), (None, None, False),      # unknown, not bad
    ("abc", None, True), ("-3", None, True), (-3, None, True), ("58 years", None, True),
    ("200", None, True), (float("nan"), None, True), (True, None, True)])
def test_age_values_are_whole_years_or_null(value, years, bad):
    assert at.age_years(value) == (years, bad)


def test_kind_is_by_word_not_by_substring():
    assert at.kind_of("Patient Age") == at.AGE and at.kind_of("PatientAge") == at.AGE
    assert at.kind_of("age_years") == at.AGE
    assert at.kind_of("Image Index") == at.TEXT and at.kind_of("Stage") == at.TEXT
    assert at.kind_of("View Position") == at.TEXT


def test_auto_keeps_the_usual_attributes_present():
    assert at.choose("auto", COLUMNS, ["Image Index", "Finding Labels", "Patient ID"]) == [
        "Patient Age", "Patient Gender", "View Position"]
    assert at.choose("none", COLUMNS) == []
    assert at.choose("View Position,Follow-up #", COLUMNS) == ["View Position", "Follow-up #"]


@pytest.mark.parametrize("column", ["Patient Name", "Accession Number", "Patient ID"])
def test_identifying_columns_are_refused(column):
    with pytest.raises(ConfigError, match=f"refusing {column!r}.*may identify a patient"):
        at.choose(f"Patient Age,{column}", COLUMNS)


@pytest.mark.parametrize("name", ["MRN", "PatientBirthDate", "patient_dob", "Study Date",
                                  "Home Address", "e-mail", "StudyInstanceUID"])
def test_identifier_names_in_any_spelling(name):
    assert at.identifying(name) is not None


def test_missing_or_reserved_attribute_columns_are_refused():
    with pytest.raises(ConfigError, match="no column 'patient age'.*did you mean 'Patient Age'"):
        at.choose("patient age", COLUMNS)
    with pytest.raises(ConfigError, match="path, label, patient or split column"):
        at.choose("Finding Labels", COLUMNS, ["Image Index", "Finding Labels"])


def test_typed_values_and_schema():
    cols = [("Patient Age", at.AGE), ("Patient Gender", at.TEXT)]
    values, bad = at.typed(cols, {"Patient Age": "abc", "Patient Gender": " F "})
    assert values == {"Patient Age": None, "Patient Gender": "F"} and bad == ["Patient Age"]
    schema = shard_schema(cols)
    assert schema.names == [*SHARD_SCHEMA.names, "Patient Age", "Patient Gender"]
    assert schema.field("Patient Age").type == pa.int16()
    assert schema.field("Patient Gender").type == pa.string()
    assert at.dicom_columns([]) == [("view_position", at.TEXT)]
    assert [c for c, _ in at.dicom_columns(["patient-characteristics"])] == [
        "view_position", "patient_age", "patient_sex"]


def _manifest(tmp_path: Path, ages: list[str]) -> Path:
    lines = ["Image Index,Finding Labels,Patient ID,Patient Age,Patient Gender,View Position,"
             "Patient Name"]
    for i, age in enumerate(ages):
        Image.fromarray(np.full((16, 16), 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,Mass,{i},{age},{'MF'[i % 2]},{'PA' if i % 2 else 'AP'},Doe^J")
    path = tmp_path / "Data_Entry.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_attributes_reach_the_rows_typed(tmp_path):
    spec = StageSpec(source=str(_manifest(tmp_path, ["058Y", "abc", "-4", "", "41"])),
                     dataset="d", image_size=16)
    listed = sources.list_source(spec)
    assert listed.attributes == (("Patient Age", at.AGE), ("Patient Gender", at.TEXT),
                                 ("View Position", at.TEXT))
    assert listed.bad_attributes == {"Patient Age": 2}  # "abc" and "-4"; empty is unknown
    decoder = remote.BatchDecoder(spec, remote.DecodeOptions(attributes=listed.attributes))
    out = decoder(listed.items)
    assert out.schema.field("Patient Age").type == pa.int16()
    assert out.column("Patient Age").to_pylist() == [58, None, None, None, 41]
    assert out.column("Patient Gender").to_pylist() == ["M", "F", "M", "F", "M"]
    assert out.column("View Position").to_pylist() == ["AP", "PA", "AP", "PA", "AP"]
    assert "Patient Name" not in out.column_names and "Doe^J" not in str(out.to_pylist())


def test_csv_identifying_attribute_fails_the_precheck(tmp_path):
    spec = StageSpec(source=str(_manifest(tmp_path, ["58"])), dataset="d",
                     attributes="Patient Age,Patient Name")
    with pytest.raises(ConfigError, match="refusing 'Patient Name'") as err:
        csv_source.check_columns(spec, csv_source.header(spec.source))
    assert err.value.exit_code == 2


def test_dicom_attributes_follow_the_deidentification_options(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ViewPosition, ds.PatientAge, ds.PatientSex = "PA", "095Y", "F"
    buf = io.BytesIO()
    ds.save_as(buf)
    path = tmp_path / "a.dcm"
    path.write_bytes(buf.getvalue())
    item = listing.items_table([{"kind": "file", "uri": str(path), "size": path.stat().st_size}])
    for retain, expected in (([], {"view_position": "PA"}),
                             (["patient-characteristics"], {"view_position": "PA",
                                                           "patient_age": 90,
                                                           "patient_sex": "F"})):
        spec = StageSpec(source=str(tmp_path), dataset="d", image_size=16, retain=retain)
        cols = tuple(at.dicom_columns(retain))
        row = remote.BatchDecoder(spec, remote.DecodeOptions(attributes=cols, fmt="dicom")
                                  )(item).to_pylist()[0]
        assert row["_error_type"] is None, row["_error_message"]
        assert {c: row[c] for c, _ in cols} == expected
        assert "patient_age" not in row or retain


def test_staged_shards_keep_typed_attributes_and_follow_a_changed_manifest(tmp_path,
                                                                            monkeypatch):
    """The stage job inline (no Ray): the shards' Parquet columns are typed, the manifest
    counts the unreadable value, and re-staging after a corrected age rewrites only that."""
    import json

    import pyarrow.parquet as pq

    from tests.support.staging import stage_inline, version_rows

    src, lake = tmp_path / "src", tmp_path / "lake"
    src.mkdir()
    csv = _manifest(src, ["058Y", "abc", "30", "41", "7"])
    opts = {"source": str(csv), "dataset": "attrs", "lake": str(lake)}
    first = stage_inline(monkeypatch, **opts)
    assert first["attributes"] == ["Patient Age", "Patient Gender", "View Position"]
    assert first["unreadable_attribute_values"] == {"Patient Age": 1}
    manifest = json.loads((lake / "datasets/attrs/1/manifest.json").read_text())
    schema = pq.read_schema(lake / manifest["shards"][0]["path"])
    assert schema.field("Patient Age").type == pa.int16()
    assert schema.field("View Position").type == pa.string()
    assert "Patient Name" not in schema.names
    ages = {r["source_uri"].rsplit("/", 1)[-1]: r["Patient Age"]
            for r in version_rows(lake, manifest).values()}
    assert ages == {"0.png": 58, "1.png": None, "2.png": 30, "3.png": 41, "4.png": 7}
    csv.write_text(csv.read_text().replace("1.png,Mass,1,abc", "1.png,Mass,1,63"))
    second = stage_inline(monkeypatch, **opts)
    assert second["reused_images"] == 5 and second["unreadable_attribute_values"] == {}
    manifest = json.loads((lake / "datasets/attrs/2/manifest.json").read_text())
    ages = {r["source_uri"].rsplit("/", 1)[-1]: r["Patient Age"]
            for r in version_rows(lake, manifest).values()}
    assert ages == {"0.png": 58, "1.png": 63, "2.png": 30, "3.png": 41, "4.png": 7}
