"""Originals kept with ``--keep-original``, without their metadata: a JPEG or PNG file rewritten
segment by segment (chunk by chunk) with only what decoding needs, so the pixels are the
same bytes and nothing else is: no EXIF (GPS, dates, camera owner), XMP, comments, ICC
profiles (their descriptions are free text), PNG text chunks (tEXt, iTXt, zTXt), eXIf or tIME.

A JPEG's EXIF orientation, which staging applied to the pixels, is kept as the one tag of a
minimal EXIF block. Other formats (BMP, TIFF, GIF, WebP) carry metadata in too many places to
rewrite safely: their originals are not kept (``strip_metadata`` returns None); DICOM
originals are de-identified by ``dicom_io``. Pure code: bytes in, bytes out.
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from medray.workers.errors import ImageError

# PNG chunks kept: the critical ones and those that change how pixels are shown, not who or when
PNG_KEEP = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB",
                      b"sBIT", b"pHYs", b"bKGD", b"hIST"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG markers without a length field: SOI, EOI, RSTn, TEM
_STANDALONE = frozenset({0xD8, 0xD9, 0x01, *range(0xD0, 0xD8)})
_APP0, _APP1, _APP14, _COM, _SOS = 0xE0, 0xE1, 0xEE, 0xFE, 0xDA
_ORIENTATION = 0x0112


def strip_metadata(data: bytes, fmt: str) -> bytes | None:
    """``data`` (a ``fmt`` file) without metadata; None for a format whose originals are not
    kept. ImageError (``invalid``) when the file's structure cannot be followed."""
    if fmt == "png":
        return strip_png(data)
    if fmt == "jpeg":
        return strip_jpeg(data)
    return None


def strip_png(data: bytes) -> bytes:
    if not data.startswith(_PNG_SIGNATURE):
        raise ImageError("not a PNG file", "invalid")
    out = bytearray(_PNG_SIGNATURE)
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise ImageError("the PNG is cut inside a chunk", "truncated")
        if kind in PNG_KEEP:
            out += data[pos:end]
        pos = end
        if kind == b"IEND":
            return bytes(out)
    raise ImageError("the PNG has no IEND chunk", "truncated")


def strip_jpeg(data: bytes) -> bytes:
    if not data.startswith(b"\xff\xd8"):
        raise ImageError("not a JPEG file", "invalid")
    orientation = _orientation(data)
    out = bytearray(b"\xff\xd8")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageError("the JPEG segment structure is broken", "invalid")
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if marker == _SOS:  # the scan and everything after it: entropy-coded pixels
            if orientation not in (None, 1):
                out[2:2] = _exif_orientation(orientation)
            return bytes(out + data[pos:])
        keep = (0xC0 <= marker <= 0xDF or marker in (0xDB, 0xDD) or marker == _APP14
                or (marker == _APP0 and length == 16))  # JFIF without a thumbnail
        if keep:  # frame, tables, restart interval, Adobe colour transform
            out += data[pos:end]
        pos = end
    raise ImageError("the JPEG has no scan", "truncated")


def _orientation(data: bytes) -> int | None:
    try:
        with Image.open(io.BytesIO(data)) as img:
            value = img.getexif().get(_ORIENTATION)
    except (OSError, ValueError, SyntaxError, struct.error, zlib.error):
        return None
    return int(value) if isinstance(value, int) else None


def _exif_orientation(orientation: int) -> bytes:
    """An APP1 segment whose EXIF holds the orientation tag alone."""
    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    body = b"Exif\x00\x00" + exif.tobytes()
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
