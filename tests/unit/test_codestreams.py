"""Compressed DICOM frames whose codestream declares more than the data set's Rows x Columns,
or more than max_pixels, are refused from the codestream header before any decoder runs
(issue #14): JPEG (SOF), JPEG-LS (SOF55), JPEG 2000 (SIZ and JP2 ihdr) and RLE (segments that
would decode to more than one frame). Every compressed file of pydicom's test corpus passes."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, SecondaryCaptureImageStorage, generate_uid

from medray.workers import codestreams, dicom_pixels
from medray.workers.errors import ImageError
from medray.workers.imaging import decode_image

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LS = "1.2.840.10008.1.2.4.80"
J2K = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"


def _jpeg(width: int, height: int, marker: int = 0xC0) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x00" * 9
    sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + bytes([0xFF, marker]) + struct.pack(">H", len(sof) + 2) + sof \
        + b"\xff\xd9"


def _j2k(width: int, height: int) -> bytes:
    siz = struct.pack(">HIIIIIIIIH", 0, width, height, 0, 0, width, height, 0, 0, 1) + \
        b"\x07\x01\x01"
    return b"\xff\x4f\xff\x51" + struct.pack(">H", len(siz) + 2) + siz + b"\xff\xd9"


def _rle(segment: bytes) -> bytes:
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return header + segment


def _dicom(frame: bytes, syntax: str, rows: int = 32, cols: int = 32) -> bytes:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(syntax)
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def no_decoder(monkeypatch):
    """Fails the test if a pixel decoder is reached: the refusal must come before it."""

    def reached(*args, **kwargs):
        raise AssertionError("a decoder ran on a frame that should have been refused")

    monkeypatch.setattr(dicom_pixels, "pixel_array", reached)


@pytest.mark.parametrize("syntax, frame", [
    (JPEG_BASELINE, _jpeg(60_000, 60_000)),
    (JPEG_LS, _jpeg(60_000, 60_000, marker=0xF7)),
    (J2K, _j2k(60_000, 60_000)),
])
def test_a_codestream_declaring_huge_dimensions_is_too_large(syntax, frame, no_decoder):
    with pytest.raises(ImageError) as err:
        decode_image(_dicom(frame, syntax), size=16, channels=1, max_pixels=50_000_000)
    assert err.value.kind == "too_large" and "60000x60000" in err.value.message


@pytest.mark.parametrize("syntax, frame", [
    (JPEG_BASELINE, _jpeg(64, 64)),
    (J2K, _j2k(33, 32)),
])
def test_a_codestream_larger_than_rows_by_columns_is_invalid(syntax, frame, no_decoder):
    with pytest.raises(ImageError) as err:
        decode_image(_dicom(frame, syntax), size=16, channels=1)
    assert err.value.kind == "invalid" and "Rows x Columns" in err.value.message


def test_a_jp2_file_box_is_read_too():
    ihdr = b"ihdr" + struct.pack(">IIH", 7000, 9000, 1) + b"\x07\x07\x00\x00"
    head = b"\x00\x00\x00\x0cjP  \r\n\x87\n" + struct.pack(">I", len(ihdr) + 4) + ihdr
    assert codestreams.j2k_size(head) == (9000, 7000)


def test_an_rle_segment_that_decodes_past_the_frame_is_invalid(no_decoder):
    # PackBits: 0x81 repeats the next byte 128 times; 40 of them make 5120 bytes for 1024 pixels
    bomb = _rle(b"\x81\x00" * 40)
    with pytest.raises(ImageError) as err:
        decode_image(_dicom(bomb, RLE), size=16, channels=1)
    assert err.value.kind == "invalid" and "5120 bytes" in err.value.message
    assert codestreams.rle_decoded_lengths(_rle(b"\x81\x00" * 8)) == [1024]


def test_an_rle_header_with_too_many_segments_is_invalid(no_decoder):
    frame = struct.pack("<16I", 3, 64, 66, 68, *([0] * 12)) + b"\x00\x01" * 3
    with pytest.raises(ImageError, match="3 segments"):
        decode_image(_dicom(frame, RLE), size=16, channels=1)


def _compressed_corpus() -> list[str]:
    root = Path(get_testdata_file("MR_small.dcm")).parent
    names = []
    for path in sorted(root.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False)
        except Exception:  # noqa: BLE001 - pydicom's corpus holds broken files on purpose
            continue
        syntax = str(getattr(ds.get("file_meta"), "TransferSyntaxUID", ""))
        if "PixelData" in ds and syntax in codestreams.FAMILIES:
            names.append(path.name)
    return names


def test_every_compressed_file_of_pydicoms_corpus_passes_the_check():
    checked = 0
    for name in _compressed_corpus():
        if name == "JPEG2000-embedded-sequence-delimiter.dcm":
            continue  # its SIZ is corrupted on purpose (Xsiz 3722445056): refused, below
        ds = pydicom.dcmread(get_testdata_file(name))
        codestreams.check_frame(ds.PixelData, ds.file_meta.TransferSyntaxUID, int(ds.Rows),
                                int(ds.Columns), int(ds.get("SamplesPerPixel", 1)),
                                int(ds.BitsAllocated), 50_000_000)
        checked += 1
    assert checked >= 30
    ds = pydicom.dcmread(get_testdata_file("JPEG2000-embedded-sequence-delimiter.dcm"))
    with pytest.raises(ImageError, match="3722445056x1024"):
        codestreams.check_frame(ds.PixelData, ds.file_meta.TransferSyntaxUID, 1024, 256, 1, 8,
                                50_000_000)
