"""De-identification: PHI planted in real DICOM files must not survive, pixels must."""

from __future__ import annotations

import hashlib
import hmac
import io
import re

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from medray.workers.deid import Deidentifier, _resolve
from medray.workers.deid_table import ACTIONS
from medray.workers.dicom_io import deidentify_bytes, safe_metadata
from medray.workers.errors import ConfigError, ImageError
from medray.workers.imaging import decode_image

SALT = b"unit-test-salt-0123456789abcdefghijklmnopqrstuvwxyz"
OTHER_SALT = b"another-salt-for-the-tests-9876-ABCDEFGHIJKLMNOPQRS"

STUDY_UID = "1.2.826.0.1.3680043.8.498.77001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.77002"
FRAME_UID = "1.2.826.0.1.3680043.8.498.77004"
REFERENCED_UID = "1.2.826.0.1.3680043.8.498.77005"

# Distinct, random-looking markers: any of them in the output is a leak.
PHI = {
    "PatientName": "Qzvrkel^Mxplt",
    "PatientID": "PIDq8f3k2Qw",
    "PatientBirthDate": "19471103",
    "PatientAddress": "12 Wqzx Lane Frobtown",
    "PatientTelephoneNumbers": "5550187234",
    "OtherPatientNames": "Brqzl^Onymx",
    "InstitutionName": "Hxqvb Wvbn Infirmary",
    "InstitutionAddress": "9 Kjxq Street",
    "AccessionNumber": "ACC99x7Qz",
    "ReferringPhysicianName": "Drvkq^Kqxzt",
    "PerformingPhysicianName": "Prfzq^Lmnox",
    "OperatorsName": "Oprzq^Vbnkt",
    "StationName": "STNqz81",
    "DeviceSerialNumber": "SNq7x3v9",
    "StudyID": "STUDYq4z",
    "StudyDate": "20230417",
    "SeriesDate": "20230418",
    "AcquisitionDate": "20230419",
    "ContentDate": "20230420",
    "StudyTime": "101112",
    "AcquisitionDateTime": "20230419131415",
    "StudyDescription": "Chest for Qzvrkel",
    "SeriesDescription": "Series Kwpzx",
    "ImageComments": "Comment Jxqvz",
    "AdditionalPatientHistory": "History Zqmvx",
    "PatientComments": "Patient comment Ylqzx",
    "EthnicGroup": "Ethnqz",
    "Occupation": "Occuqzx",
}
PRIVATE_MARKER = "PRIVq1x9zz"
NESTED_PID = "PIDnested7q"
OVERLAY_MARKER = "OVLq3zx"


def build_dataset(sop_uid: str, pixels: np.ndarray | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.SourceApplicationEntityTitle = "AEqzx77"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FRAME_UID
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientSex = "F"
    ds.PatientAge = "076Y"
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = REFERENCED_UID
    ds.ReferencedImageSequence = Sequence([ref])
    other = Dataset()
    other.PatientID = NESTED_PID
    ds.OtherPatientIDsSequence = Sequence([other])
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x01, "LO", PRIVATE_MARKER)
    ds.add_new(0x60004000, "LT", OVERLAY_MARKER)  # overlay comments
    if pixels is None:
        pixels = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 7
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelSpacing = [0.143, 0.143]
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def all_uids(ds: Dataset) -> set[str]:
    """Instance UIDs (not class UIDs, which name a kind of object and are kept)."""
    found: set[str] = set()
    for elem in [*ds.iterall(), *ds.file_meta.iterall()]:
        if elem.VR == "UI" and elem.value and not elem.keyword.endswith("ClassUID"):
            values = elem.value if elem.VM > 1 else [elem.value]
            found.update(str(v) for v in values)
    return found


@pytest.fixture
def deid() -> Deidentifier:
    return Deidentifier(SALT)


@pytest.fixture
def original() -> bytes:
    return to_bytes(build_dataset("1.2.826.0.1.3680043.8.498.77003"))


def test_no_phi_survives_in_bytes_or_metadata(deid: Deidentifier, original: bytes) -> None:
    out, meta = deidentify_bytes(original, deid)
    text = out.decode("latin-1") + repr(meta)
    markers = [*PHI.values(), PRIVATE_MARKER, NESTED_PID, OVERLAY_MARKER, "AEqzx77"]
    for marker in markers:
        assert marker in original.decode("latin-1")  # planted for real
        assert marker not in text, f"leaked: {marker}"
    for uid in (STUDY_UID, SERIES_UID, FRAME_UID, REFERENCED_UID, "77003"):
        assert uid not in text, f"original UID leaked: {uid}"
    assert "Qzvrkel" not in text and "1947" not in text


def test_output_is_valid_dicom_with_expected_changes(deid: Deidentifier, original: bytes) -> None:
    out, meta = deidentify_bytes(original, deid)
    assert out[128:132] == b"DICM" and out[:128] == b"\x00" * 128
    ds = pydicom.dcmread(io.BytesIO(out))
    assert ds.PatientIdentityRemoved == "YES"
    assert "Basic Profile, edition 2026c" in "\\".join(ds.DeidentificationMethod)
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.PatientID == deid.patient_key(PHI["PatientID"])
    assert ds.PatientName == "" and ds.PatientBirthDate == "" and ds.PatientSex == ""
    for removed in ("InstitutionName", "PatientAge", "SeriesDate", "EthnicGroup", "PatientAddress"):
        assert removed not in ds
    assert ds.StudyDate == "" and ds.AccessionNumber == ""
    assert not any(elem.tag.is_private for elem in ds.iterall())
    assert not any(0x6000 <= elem.tag.group <= 0x60FF for elem in ds)
    # kept: what a model needs and the classes of things
    assert ds.Modality == "CR" and ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    assert ds.file_meta.MediaStorageSOPClassUID == SecondaryCaptureImageStorage
    # remapped consistently, inside sequences too
    assert ds.StudyInstanceUID == deid.remap_uid(STUDY_UID)
    assert ds.FrameOfReferenceUID == deid.remap_uid(FRAME_UID)
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    item = ds.ReferencedImageSequence[0]
    assert item.ReferencedSOPInstanceUID == deid.remap_uid(REFERENCED_UID)
    assert item.ReferencedSOPClassUID == CTImageStorage
    assert "OtherPatientIDsSequence" not in ds
    assert meta["modality"] == "CR" and meta["body_part_examined"] == "CHEST"
    assert meta["pixel_spacing"] == "0.143\\0.143"
    assert "patient_sex" not in meta and "F" not in meta.values()


def test_pixels_are_unchanged(deid: Deidentifier, original: bytes) -> None:
    out, _ = deidentify_bytes(original, deid)
    before = pydicom.dcmread(io.BytesIO(original)).pixel_array
    after = pydicom.dcmread(io.BytesIO(out)).pixel_array
    assert np.array_equal(before, after)
    a = decode_image(original, size=16, channels=1)
    b = decode_image(out, size=16, channels=1)
    assert np.array_equal(a.pixels, b.pixels)
    assert b.patient_ref == deid.patient_key(PHI["PatientID"])


def test_uids_consistent_across_files_of_one_study(deid: Deidentifier) -> None:
    first, _ = deidentify_bytes(to_bytes(build_dataset("1.2.826.0.1.3680043.8.498.81")), deid)
    second, _ = deidentify_bytes(to_bytes(build_dataset("1.2.826.0.1.3680043.8.498.82")), deid)
    a, b = (pydicom.dcmread(io.BytesIO(x)) for x in (first, second))
    assert a.StudyInstanceUID == b.StudyInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.PatientID == b.PatientID
    assert a.SOPInstanceUID != b.SOPInstanceUID
    other, _ = deidentify_bytes(
        to_bytes(build_dataset("1.2.826.0.1.3680043.8.498.81")), Deidentifier(OTHER_SALT)
    )
    c = pydicom.dcmread(io.BytesIO(other))
    assert c.StudyInstanceUID != a.StudyInstanceUID
    assert c.PatientID != a.PatientID


def test_deidentify_leaves_the_original_untouched(deid: Deidentifier) -> None:
    ds = build_dataset("1.2.826.0.1.3680043.8.498.90")
    clean = deid.deidentify(ds)
    assert ds.PatientName == PHI["PatientName"]
    assert ds.StudyInstanceUID == STUDY_UID
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == REFERENCED_UID
    assert any(elem.tag.is_private for elem in ds)
    assert clean.PatientName == ""
    assert not (all_uids(clean) & {STUDY_UID, SERIES_UID, FRAME_UID, REFERENCED_UID})


def test_real_pydicom_file(deid: Deidentifier) -> None:
    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    with open(path, "rb") as fh:
        data = fh.read()
    ds = pydicom.dcmread(io.BytesIO(data))
    originals = {uid for uid in all_uids(ds) if not uid.startswith("1.2.840.10008.")}
    assert any(elem.tag.is_private for elem in ds)  # the file does carry private tags
    out, meta = deidentify_bytes(data, deid)
    text = out.decode("latin-1")
    assert str(ds.PatientName) not in text
    assert ds.PatientID not in text.replace(deid.patient_key(ds.PatientID), "")
    for uid in originals:
        assert uid not in text
    clean = pydicom.dcmread(io.BytesIO(out))
    assert not any(elem.tag.is_private for elem in clean.iterall())
    assert np.array_equal(clean.pixel_array, ds.pixel_array)
    assert meta["modality"] == "CT"


def test_dataset_without_file_meta_gets_a_proper_file(deid: Deidentifier) -> None:
    ds = build_dataset("1.2.826.0.1.3680043.8.498.95")
    ds.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True, enforce_file_format=False)
    out, _ = deidentify_bytes(buf.getvalue(), deid)
    assert out[128:132] == b"DICM"
    clean = pydicom.dcmread(io.BytesIO(out))
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert PHI["PatientName"] not in out.decode("latin-1")


def test_salt_must_be_long_bytes() -> None:
    with pytest.raises(ConfigError):
        Deidentifier(b"short")
    with pytest.raises(ConfigError, match="too weak"):  # long but guessable
        Deidentifier(b"a" * 64)
    with pytest.raises(ConfigError, match="too weak"):  # hex of 16 bytes: too short
        Deidentifier(b"00112233445566778899aabbccddeeff")
    Deidentifier(bytes(range(32)))
    Deidentifier(bytes(range(32)).hex().encode())  # medray's own salt file: 32 bytes as hex
    with pytest.raises(ConfigError):
        Deidentifier("a string salt that is long enough")  # type: ignore[arg-type]
    assert "salt-0123" not in repr(Deidentifier(SALT))


def test_patient_key(deid: Deidentifier) -> None:
    key = deid.patient_key("12345")
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert key == hmac.new(SALT, b"12345", hashlib.sha256).hexdigest()[:32]
    assert key == Deidentifier(SALT).patient_key("12345")
    assert key != deid.patient_key("12346")
    assert "12345" not in key


def test_remap_uid_is_a_valid_consistent_uid(deid: Deidentifier) -> None:
    new = deid.remap_uid(STUDY_UID)
    assert new == deid.remap_uid(STUDY_UID)
    assert new != deid.remap_uid(SERIES_UID)
    assert new.startswith("2.25.") and len(new) <= 64
    assert re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*", new)
    assert pydicom.uid.UID(new).is_valid


def test_profile_table_resolves() -> None:
    for code in set(ACTIONS.values()):
        assert _resolve(code, "LO") in {"X", "Z", "D", "U", "recurse"}
    assert _resolve("X/Z/D", "LO") == "X"
    assert _resolve("Z/D", "DA") == "Z"
    assert _resolve("D", "SQ") == "X"
    assert _resolve("X/Z/U*", "SQ") == "recurse"


def test_safe_metadata_only_safe_keys() -> None:
    ds = build_dataset("1.2.826.0.1.3680043.8.498.99")
    meta = safe_metadata(ds)
    assert set(meta) <= {
        "modality",
        "body_part_examined",
        "view_position",
        "rows",
        "columns",
        "bits_stored",
        "photometric_interpretation",
        "pixel_spacing",
        "burned_in_annotation",
        "transfer_syntax",
    }
    assert meta["rows"] == 16 and meta["bits_stored"] == 16


def test_bad_input_raises_image_error(deid: Deidentifier) -> None:
    with pytest.raises(ImageError) as info:
        deidentify_bytes(b"", deid)
    assert info.value.kind == "empty"
    with pytest.raises(ImageError):
        deidentify_bytes(b"\x00" * 10, deid)
