"""Inputs built on the fly: small MedMNIST cuts of the real data set, and images that lie.

The hostile ones (PNG and JPEG headers claiming huge sizes, decompression bombs, DICOM with PHI,
without pixels or with an unsupported transfer syntax) are the staging corpus of the fault and
security suites; ``bomb_png`` is the smallest of them for single-file tests.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.paths import DATA


def small_npz(path: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    """A MedMNIST-style .npz cut from the real PneumoniaMNIST file (both classes kept)."""
    d = np.load(DATA)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in per_split.items():
        labels = d[f"{split}_labels"].ravel()
        idx = np.concatenate(
            [rng.choice(np.flatnonzero(labels == c), n // 2, replace=False) for c in (0, 1)]
        )
        out[f"{split}_images"] = d[f"{split}_images"][idx]
        out[f"{split}_labels"] = d[f"{split}_labels"][idx]
    np.savez(path, **out)
    return path


# ----------------------------------------------------------------------------- images that lie
PHI_NAME = "DOE^JANE^PHIMARKER"
PHI_ID = "PHI-ID-7781234"
PHI_TEXT = (PHI_NAME, PHI_ID, "PHI-ACC-55120", "Saint PHI Hospital")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_claiming(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR (valid CRC) claims ``width`` x ``height`` 8-bit gray pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    if idat:
        out += _png_chunk(b"IDAT", idat)
    return out + _png_chunk(b"IEND", b"")


TINY_IDAT = zlib.compress(b"\x00" * 64)  # a valid zlib stream, far too short for any claim


def bomb_png(path: Path, side: int = 40_000) -> Path:
    """A PNG file whose header claims side x side pixels, with almost no data."""
    path.write_bytes(png_claiming(side, side, TINY_IDAT))
    return path


def png_bomb(side: int) -> bytes:
    """A real, fully decodable all-black gray PNG of ``side`` x ``side`` (a decompression bomb:
    about 1 kB per megapixel on disk)."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(side)]
    parts.append(comp.flush())
    return png_claiming(side, side, b"".join(parts))


def jpeg_claiming(width: int, height: int) -> bytes:
    """SOI + a baseline SOF0 that claims ``width`` x ``height`` + EOI, no scan data."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def _encode(img: Any, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def dicom_bytes(pixels: bool = True, transfer_syntax: str | None = None,
                phi: bool = True, frame: bytes | None = None) -> bytes:
    """A small MONOCHROME2 DICOM with PHI in its header (optionally without pixel data, or
    labelled with another transfer syntax, its one encapsulated frame ``frame``)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import (
        UID,
        ComputedRadiographyImageStorage,
        ExplicitVRLittleEndian,
        generate_uid,
    )

    meta = FileMetaDataset()
    # a radiograph: secondary captures may carry burned-in text and are refused by default
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CR"
    if phi:
        ds.PatientName = PHI_NAME
        ds.PatientID = PHI_ID
        ds.AccessionNumber = PHI_TEXT[2]
        ds.InstitutionName = PHI_TEXT[3]
        ds.PatientBirthDate = "19450317"
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if pixels:
        rng = np.random.default_rng(5)
        raw = rng.integers(0, 255, (32, 32), dtype=np.uint8).tobytes()
        if transfer_syntax:  # a compressed syntax: one encapsulated frame (not real MPEG-2)
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([frame if frame is not None else raw])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = raw
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# name -> None when the item must be staged, else the error kinds it may get
CORPUS_EXPECT: dict[str, set[str] | None] = {
    "good.png": None,
    "good.jpg": None,
    "one_by_one.png": None,
    "cmyk.jpg": None,
    "gray16.png": None,
    "palette_alpha.png": None,
    "phi.dcm": None,
    "zero.png": {"empty"},
    "truncated.jpg": {"truncated"},
    "truncated.png": {"truncated"},
    "text_renamed.png": {"not_an_image"},
    "huge_claim.png": {"too_large"},
    "huge_claim.jpg": {"too_large"},
    "bomb.png": {"too_large"},
    "no_pixels.dcm": {"no_pixel_data"},
    "mpeg2_syntax.dcm": {"unsupported"},
    "codestream_bomb.dcm": {"too_large"},
}


def build_corpus(root: Path) -> dict[str, Path]:
    """Broken and hostile images under root/<label>/ (a folder source); returns name -> path."""
    from PIL import Image

    rng = np.random.default_rng(9)
    rgb = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    png, jpg = _encode(rgb, "PNG"), _encode(rgb, "JPEG", quality=90)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    data = {
        "good.png": png,
        "good.jpg": _encode(rgb.rotate(90), "JPEG", quality=85),
        "one_by_one.png": _encode(Image.new("L", (1, 1), 200), "PNG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "gray16.png": _encode(Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)),
                              "PNG"),
        "palette_alpha.png": _encode(palette, "PNG"),
        "phi.dcm": dicom_bytes(),
        "zero.png": b"",
        "truncated.jpg": jpg[: len(jpg) // 2],
        "truncated.png": png[: len(png) * 2 // 3],
        "text_renamed.png": b"patient list, not an image\n" * 20,
        "huge_claim.png": png_claiming(40000, 40000, b"x" * 64),
        "huge_claim.jpg": jpeg_claiming(60000, 60000),
        "bomb.png": png_bomb(12000),
        "no_pixels.dcm": dicom_bytes(pixels=False, phi=False),
        "mpeg2_syntax.dcm": dicom_bytes(transfer_syntax="1.2.840.10008.1.2.4.100", phi=False),
        # a 32 x 32 data set whose JPEG frame declares 60000 x 60000 (3.6 gigapixels)
        "codestream_bomb.dcm": dicom_bytes(transfer_syntax="1.2.840.10008.1.2.4.50", phi=False,
                                           frame=jpeg_claiming(60000, 60000)),
    }
    assert set(data) == set(CORPUS_EXPECT)
    paths = {}
    for name, blob in data.items():
        label = "ok" if CORPUS_EXPECT[name] is None else "bad"
        path = root / label / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
        paths[name] = path
    return paths


# ----------------------------------------------------------------------------- .npz bombs
def _npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    """A .npy v1.0 header for a C-ordered array of ``shape``."""
    text = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape!r}, }}"
    text += " " * (63 - (10 + len(text)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode()


def npz_bomb(path: Path, side: int = 20_000, real: bool = True) -> Path:
    """A MedMNIST-style .npz whose ``train_images`` is one side x side image of zeros (about
    side**2 bytes inflated, a thousandth of that on disk; ``real=False``: the header alone),
    beside a small, valid ``test`` pair, so a job has something to stage."""
    import zipfile

    good = np.random.default_rng(4).integers(0, 255, (4, 28, 28), dtype=np.uint8)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("train_images.npy", "w", force_zip64=True) as fh:
            fh.write(_npy_header((1, side, side)))
            zeros = b"\0" * (1 << 22)
            left = side * side if real else 0
            while left > 0:
                fh.write(zeros[:left])
                left -= len(zeros)
        for name, arr in (("train_labels", np.array([[0]])), ("test_images", good),
                          ("test_labels", np.array([[0], [1], [0], [1]]))):
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{name}.npy", buf.getvalue())
    return path
