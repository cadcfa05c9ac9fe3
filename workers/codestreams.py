"""What a compressed DICOM frame declares, read from its codestream header before any decoder
runs: JPEG (SOF), JPEG-LS (SOF55), JPEG 2000 and HTJ2K (SIZ, or the JP2 ``ihdr`` box) and
RLE (its segment table, and how many bytes each segment would decode to).

The DICOM header's Rows x Columns is checked against ``max_pixels`` elsewhere; a decoder,
though, allocates what the codestream says, which can be far larger. ``check_frame`` refuses
a frame whose codestream declares more pixels than ``max_pixels`` (``too_large``) or more
than the data set's Rows x Columns (``invalid``), and an RLE frame whose segments would
decode to more than one frame's bytes. Pure code: bytes in, ImageError or nothing out.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from medray.workers.errors import ImageError

# transfer syntax UID -> codestream family
JPEG = "jpeg"
JPEG_LS = "jpeg-ls"
J2K = "jpeg2000"
RLE = "rle"
FAMILIES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": JPEG,
    "1.2.840.10008.1.2.4.51": JPEG,
    "1.2.840.10008.1.2.4.57": JPEG,
    "1.2.840.10008.1.2.4.70": JPEG,
    "1.2.840.10008.1.2.4.80": JPEG_LS,
    "1.2.840.10008.1.2.4.81": JPEG_LS,
    "1.2.840.10008.1.2.4.90": J2K,
    "1.2.840.10008.1.2.4.91": J2K,
    "1.2.840.10008.1.2.4.201": J2K,
    "1.2.840.10008.1.2.4.202": J2K,
    "1.2.840.10008.1.2.4.203": J2K,
    "1.2.840.10008.1.2.5": RLE,
}
# JPEG start-of-frame markers: SOF0..SOF15 less DHT (C4), JPG (C8) and DAC (CC); SOF55 is JPEG-LS
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
                  0xF7})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length field
_ITEM = b"\xfe\xff\x00\xe0"
_DELIMITER = b"\xfe\xff\xdd\xe0"
HEADER_SCAN = 1 << 20  # bytes of the first fragments searched for a frame header


def fragments(pixel_data: bytes) -> Iterator[memoryview]:
    """The fragments of encapsulated pixel data (the Basic Offset Table skipped), as views."""
    view = memoryview(pixel_data)
    pos, first = 0, True
    while pos + 8 <= len(view):
        tag = bytes(view[pos:pos + 4])
        (length,) = struct.unpack_from("<I", view, pos + 4)
        if tag == _DELIMITER:
            return
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise ImageError("the encapsulated pixel data is malformed (expected an item tag)",
                             "invalid")
        body = view[pos + 8:pos + 8 + length]
        pos += 8 + length
        if first:  # the Basic Offset Table
            first = False
            continue
        yield body


def _head(pixel_data: bytes) -> bytes:
    """The start of the first frame's codestream (fragments joined up to HEADER_SCAN)."""
    out = bytearray()
    for piece in fragments(pixel_data):
        out += piece[:HEADER_SCAN - len(out)]
        if len(out) >= HEADER_SCAN:  # an ICC profile may sit before the frame header
            break
    return bytes(out)


def jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG or JPEG-LS frame header, None when there is none."""
    if head[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", head, pos + 2)
        if marker in _SOF:
            if pos + 9 > len(head):
                return None
            height, width = struct.unpack_from(">HH", head, pos + 5)
            return width, height
        if marker in (0xDA, 0xD9):  # start of scan or end of image: no frame header before
            return None
        pos += 2 + length
    return None


def j2k_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG 2000 / HTJ2K codestream (SIZ) or JP2 file (ihdr)."""
    if head[:4] == b"\xff\x4f\xff\x51":  # SOC then SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz
        if len(head) < 24:
            return None
        x, y, x0, y0 = struct.unpack_from(">IIII", head, 8)
        return max(0, x - x0), max(0, y - y0)
    at = head.find(b"ihdr")
    if head[4:8] == b"jP  " and at >= 4 and at + 12 <= len(head):
        height, width = struct.unpack_from(">II", head, at + 4)
        return width, height
    return None


def rle_decoded_lengths(frame: bytes) -> list[int]:
    """How many bytes each segment of an RLE frame decodes to, counted without decoding
    (PackBits: a header byte n < 128 copies n+1 bytes, n > 128 repeats one byte 257-n times)."""
    if len(frame) < 64:
        raise ImageError("the RLE frame is shorter than its 64-byte header", "truncated")
    count, *offsets = struct.unpack_from("<16I", frame, 0)
    if not 1 <= count <= 15:
        raise ImageError(f"the RLE header declares {count} segments (1 to 15 allowed)", "invalid")
    bounds = [*offsets[:count], len(frame)]
    lengths = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        if not 64 <= start <= end <= len(frame):
            raise ImageError("the RLE segment offsets are out of order or out of the frame",
                             "invalid")
        lengths.append(_packbits_length(frame, start, end))
    return lengths


def _packbits_length(data: bytes, pos: int, end: int) -> int:
    total = 0
    while pos < end:
        n = data[pos]
        if n < 128:
            total += n + 1
            pos += n + 2
        elif n > 128:
            total += 257 - n
            pos += 2
        else:
            pos += 1
    return total


def check_frame(pixel_data: bytes, transfer_syntax: str, rows: int, columns: int,
                samples: int, bits_allocated: int, max_pixels: int) -> None:
    """ImageError when the first compressed frame declares more than it may (module doc);
    nothing for native pixel data and syntaxes whose header is not read here."""
    family = FAMILIES.get(str(transfer_syntax))
    if family is None:
        return
    if family == RLE:
        frame = next(iter(fragments(pixel_data)), None)
        if frame is None:
            raise ImageError("the RLE pixel data has no frame", "truncated")
        per_segment = rows * columns
        segments = rle_decoded_lengths(bytes(frame))
        if len(segments) > samples * max(1, (bits_allocated + 7) // 8):
            raise ImageError(f"the RLE frame has {len(segments)} segments, more than "
                             f"{samples} samples of {bits_allocated} bits need", "invalid")
        if max(segments) > per_segment + 1:  # +1: a segment is padded to an even length
            raise ImageError(f"an RLE segment decodes to {max(segments)} bytes, more than the "
                             f"{per_segment} of Rows x Columns", "invalid")
        return
    head = _head(pixel_data)
    size = j2k_size(head) if family == J2K else jpeg_size(head)
    name = {JPEG: "JPEG", JPEG_LS: "JPEG-LS", J2K: "JPEG 2000"}[family]
    if size is None:
        raise ImageError(f"the {name} codestream has no frame header where it should", "invalid")
    width, height = size
    if width * height > max_pixels:
        raise ImageError(f"the {name} codestream declares {width}x{height} = {width * height} "
                         f"pixels, more than the limit of {max_pixels}", "too_large")
    if width * height > rows * columns:
        raise ImageError(f"the {name} codestream declares {width}x{height} pixels, more than "
                         f"the data set's Rows x Columns {columns}x{rows}", "invalid")
