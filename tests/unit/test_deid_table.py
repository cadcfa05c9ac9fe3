"""The whole PS3.15 Table E.1-1, generated and applied (issue #13): the shipped table is what
``tools/gen_deid_table.py`` makes from dicom-anonymizer; a DICOM with a marker in every listed
attribute (at the top and two sequences deep) keeps none of them, option by option only what
the option documents; the stricter rules, the method attributes, burned-in text and the
originals of other formats (docs/deid.md names this file for each promise)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import struct

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from medray.workers import deid, originals
from medray.workers.deid import (
    DESCRIPTORS,
    PATIENT_CHARACTERISTICS,
    Deidentifier,
    Options,
    burned_in_reason,
)
from medray.workers.deid_table import ACTIONS, EDITION
from medray.workers.dicom_io import deidentify_bytes
from medray.workers.errors import ImageError
from tests.support.deid_markers import Marked, elements_at, leaked_elements, marker_dicom
from tests.support.paths import ROOT

SALT = bytes(range(7, 39))


def _generator():
    spec = importlib.util.spec_from_file_location("gen_deid_table",
                                                  ROOT / "tools" / "gen_deid_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_table_is_a_fresh_generation_of_the_named_edition():
    gen = _generator()
    assert (ROOT / "workers" / "deid_table.py").read_text() == gen.render()
    assert EDITION == gen.EDITION == "2026c"
    assert len(ACTIONS) > 600  # every row, not a transcription of some


def _clean(marked: Marked, options: Options | None = None) -> tuple[bytes, pydicom.Dataset]:
    out, _ = deidentify_bytes(marked.data, Deidentifier(SALT, options))
    return out, pydicom.dcmread(io.BytesIO(out))


def _text_hits(out: bytes, marked: Marked, skip: frozenset[int] = frozenset()) -> list[str]:
    return [f"{t:08X}" for t, v in marked.text.items() if t not in skip and v.encode() in out]


@pytest.mark.parametrize("nested", [False, True], ids=["top-level", "two-sequences-deep"])
def test_no_listed_attribute_keeps_its_marker(nested):
    marked = marker_dicom(nested)
    assert all(v.encode() in marked.data for v in marked.text.values())  # planted for real
    out, ds = _clean(marked)
    assert _text_hits(out, marked) == []
    assert leaked_elements(ds, marked) == []
    assert ds.PatientIdentityRemoved == "YES"
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(io.BytesIO(marked.data)).pixel_array)
    if nested:  # the sequences the table does not list are kept, their items cleaned
        assert elements_at(ds, nested=True) is not None


def test_the_check_sees_a_listed_attribute_that_is_kept(monkeypatch):
    marked = marker_dicom()
    kept = Tag("ReasonForTheRequestedProcedure")
    action = Deidentifier.action
    monkeypatch.setattr(Deidentifier, "action", lambda self, tag, elem: "K" if tag == kept
                        else action(self, tag, elem))
    out, ds = _clean(marked)
    assert _text_hits(out, marked) == [f"{int(kept):08X}"]
    assert leaked_elements(ds, marked) == [f"{int(kept):08X} ReasonForTheRequestedProcedure"]


def test_retain_patient_characteristics_keeps_sex_age_size_weight_only():
    marked = marker_dicom()
    out, ds = _clean(marked, Options(retain_patient_characteristics=True))
    kept = frozenset(int(Tag(k)) for k in PATIENT_CHARACTERISTICS)
    assert _text_hits(out, marked, skip=kept) == []
    assert leaked_elements(ds, marked, keep=kept) == []
    for keyword in PATIENT_CHARACTERISTICS:
        assert ds[keyword].value == marked.values[int(Tag(keyword))], keyword
    codes = [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113108"]


def test_retain_longitudinal_shifts_every_date_by_one_keyed_per_patient_offset():
    marked = marker_dicom()
    out, ds = _clean(marked, Options(retain_longitudinal=True))
    shift = Deidentifier(SALT).shift_days(str(pydicom.dcmread(io.BytesIO(marked.data))
                                             .get("PatientID", "")))
    assert 1 <= shift <= deid.MAX_SHIFT_DAYS
    dates = {t: v for t, v in marked.values.items() if ds.get(Tag(t)) is not None
             and ds[Tag(t)].VR == "DA" and ds[Tag(t)].value}
    assert len(dates) > 40
    for tag, value in dates.items():
        expected = dt.datetime.strptime(str(value), "%Y%m%d").date() - dt.timedelta(days=shift)
        assert ds[Tag(tag)].value == expected.strftime("%Y%m%d")
    assert not ds.get("PatientBirthDate")  # a birth date is never kept, shifted or not
    times = frozenset(t for t in marked.values if ds.get(Tag(t)) is not None
                      and ds[Tag(t)].VR == "TM")
    assert _text_hits(out, marked, skip=times) == []  # a whole-day shift keeps times of day
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    other = Deidentifier(SALT).shift_days("another patient")
    assert other != shift or Deidentifier(SALT).shift_days("a third") != shift


def test_clean_descriptors_keeps_descriptions_without_names_ids_or_dates():
    ds = Dataset()
    ds.PatientName, ds.PatientID = "Qzvrkel^Mxplt", "PIDq8f3k2Qw"
    ds.StudyDescription = "CHEST PA qzvrkel 20230417 follow-up PIDq8f3k2Qw"
    ds.ImageComments = "CHEST PA"  # not a descriptor the option keeps: removed
    clean = Deidentifier(SALT, Options(clean_descriptors=True)).deidentify(ds)
    assert clean.StudyDescription == "CHEST PA follow-up"
    assert "ImageComments" not in clean
    assert "StudyDescription" not in Deidentifier(SALT).deidentify(ds)
    assert [i.CodeValue for i in clean.DeidentificationMethodCodeSequence] == ["113100",
                                                                              "113105"]
    assert {"StudyDescription", "SeriesDescription", "ProtocolName"} <= DESCRIPTORS


def test_stricter_than_the_profile():
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Manufacturer, ds.ManufacturerModelName = "MKVENDOR", "MKMODEL"
    ds.add_new(0x00091001, "LO", "MKPRIVATE")
    ds.add_new(0x00180002, "UN", b"MKUNKNOWNVR")  # a public element no dictionary knows
    ds.add_new(0x00283003, "UN", b"MKUN2 ")       # LUTExplanation read as UN: text, unlisted
    ds.WindowCenterWidthExplanation = "MK text nobody listed"
    ds.PixelSpacingCalibrationDescription = "MK calibrated at Saint X"
    ds.DateOfLastCalibration = "20200101"                       # a listed date
    ds.DecayCorrectionDateTime = "20200101120000"
    ds.RescaleType, ds.RescaleSlope = "HU", "1"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "T-D3000", "SRT", "Chest"
    ds.AnatomicRegionSequence = [code]
    clean = Deidentifier(SALT).deidentify(ds)
    for gone in ("Manufacturer", "ManufacturerModelName", "WindowCenterWidthExplanation",
                 "PixelSpacingCalibrationDescription", "DateOfLastCalibration"):
        assert gone not in clean, gone
    assert Tag(0x00091001) not in clean and Tag(0x00180002) not in clean
    assert Tag(0x00283003) not in clean
    assert clean.DecayCorrectionDateTime == "19000101000000"  # a D row: a dummy value
    assert (clean.Modality, clean.BodyPartExamined, clean.ViewPosition) == ("CR", "CHEST", "PA")
    assert clean.RescaleType == "HU" and clean.AnatomicRegionSequence[0].CodeMeaning == "Chest"
    kept = Deidentifier(SALT, Options(retain_manufacturer=True)).deidentify(ds)
    assert (kept.Manufacturer, kept.ManufacturerModelName) == ("MKVENDOR", "MKMODEL")


def test_the_method_attributes_say_what_was_done():
    ds = Deidentifier(SALT, Options(retain_longitudinal=True, clean_descriptors=True,
                                    retain_patient_characteristics=True)).deidentify(Dataset())
    assert ds.PatientIdentityRemoved == "YES"
    method = list(ds.DeidentificationMethod)
    assert f"PS3.15 E.1-1 Basic Profile, edition {EDITION}" in method
    assert all(len(m) <= 64 for m in method)
    assert "Clean Descriptors Option" in method
    codes = [(i.CodeValue, i.CodingSchemeDesignator) for i in
             ds.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113105", "DCM"), ("113107", "DCM"), ("113108", "DCM")]
    plain = Deidentifier(SALT).deidentify(Dataset())
    assert [i.CodeValue for i in plain.DeidentificationMethodCodeSequence] == ["113100"]
    assert plain.LongitudinalTemporalInformationModified == "REMOVED"


@pytest.mark.parametrize("attrs, why", [
    ({"BurnedInAnnotation": "YES", "Modality": "CR"}, "BurnedInAnnotation"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "Modality": "OT"}, "SOP class"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.4", "Modality": "OT"}, "SOP class"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1", "Modality": "US"}, "SOP class"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1", "Modality": "XC"}, "modality XC"),
])
def test_images_that_may_carry_burned_in_text_are_named(attrs, why):
    ds = Dataset()
    for key, value in attrs.items():
        setattr(ds, key, value)
    assert why in (burned_in_reason(ds) or "")


def test_an_ordinary_radiograph_is_not_suspected_of_burned_in_text():
    ds = Dataset()
    ds.SOPClassUID, ds.Modality, ds.BurnedInAnnotation = "1.2.840.10008.5.1.4.1.1.1", "CR", "NO"
    assert burned_in_reason(ds) is None
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.10"  # not a prefix match of .77.1.1
    assert burned_in_reason(ds) is None


# ---------------------------------------------------------------------------- originals
def _png_with_text() -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(1).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    info.add_text("Author", "MKAUTHOR^PATIENT")
    info.add_itxt("Comment", "MKITXT note", zip=True)
    info.add_text("Description", "MKZTXT " * 20, zip=True)
    buf = io.BytesIO()
    img.save(buf, "PNG", pnginfo=info, exif=b"Exif\x00\x00MM\x00*MKEXIF")
    return buf.getvalue(), pixels


def test_a_kept_png_loses_its_text_chunks_and_keeps_its_pixels():
    data, pixels = _png_with_text()
    assert b"MKAUTHOR" in data and b"tEXt" in data and b"zTXt" in data and b"iTXt" in data
    out = originals.strip_metadata(data, "png")
    assert out is not None
    for needle in (b"MKAUTHOR", b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"MKEXIF"):
        assert needle not in out, needle
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(out))), pixels)


def _jpeg_with_metadata(orientation: int = 6) -> bytes:
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 32, 3),
                                                            dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x013B] = "MKARTIST"           # Artist
    exif[0x010E] = "MKDESCRIPTION"      # ImageDescription
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes(), comment=b"MKCOMMENT",
             icc_profile=b"\x00" * 64 + b"MKICC")
    data = buf.getvalue()
    xmp = b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta>MKXMP</x:xmpmeta>"
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(xmp) + 2) + xmp + data[2:]


def test_a_kept_jpeg_loses_exif_xmp_comments_and_icc_but_not_pixels_or_orientation():
    data = _jpeg_with_metadata()
    for needle in (b"MKARTIST", b"MKDESCRIPTION", b"MKCOMMENT", b"MKICC", b"MKXMP"):
        assert needle in data
    out = originals.strip_metadata(data, "jpeg")
    assert out is not None
    for needle in (b"MKARTIST", b"MKDESCRIPTION", b"MKCOMMENT", b"MKICC", b"MKXMP",
                   b"ICC_PROFILE"):
        assert needle not in out, needle
    before, after = Image.open(io.BytesIO(data)), Image.open(io.BytesIO(out))
    assert np.array_equal(np.asarray(before), np.asarray(after))  # the same scan, bit for bit
    assert after.getexif().get(0x0112) == 6 and set(after.getexif()) == {0x0112}
    plain = originals.strip_metadata(_jpeg_with_metadata(orientation=1), "jpeg")
    assert plain is not None and b"Exif" not in plain


def test_originals_of_other_formats_are_not_kept_and_broken_ones_are_refused():
    assert originals.strip_metadata(b"GIF89a...", "gif") is None
    with pytest.raises(ImageError):
        originals.strip_png(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 99) + b"IHDR")
    with pytest.raises(ImageError):
        originals.strip_jpeg(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 9)


def test_pydicom_warnings_that_quote_values_are_silenced_in_staging_workers(caplog):
    import logging
    import warnings

    from pydicom.data import get_testdata_file

    from medray.workers.dicom_io import quiet_pydicom, read_dicom

    data = open(get_testdata_file("badVR.dcm"), "rb").read()  # noqa: SIM115 - a test read
    value = "1.2.123.456.78.9.0123.4567"  # an invalid UID the file holds
    with warnings.catch_warnings(record=True) as loud:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING, logger="pydicom"):
            read_dicom(data)
    assert any(value in str(w.message) for w in loud) and value in caplog.text  # it would leak
    caplog.clear()
    level = logging.getLogger("pydicom").level
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        try:
            quiet_pydicom()
            with caplog.at_level(logging.WARNING):
                read_dicom(data)
        finally:
            logging.getLogger("pydicom").setLevel(level)
    assert not [w for w in quiet if value in str(w.message)] and value not in caplog.text


def test_every_test_the_deid_promise_names_exists():
    import re

    text = (ROOT / "docs" / "deid.md").read_text() + (ROOT / "SECURITY.md").read_text()
    named = set(re.findall(r"`(?:[\w/]+\.py::)?(test_\w+)`", text))
    defined = {m for path in (ROOT / "tests").rglob("test_*.py")
               for m in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    assert len(named) > 20
    assert not named - defined, sorted(named - defined)
