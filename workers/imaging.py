"""Decode image bytes (JPEG, PNG, DICOM, BMP, TIFF, GIF, WebP) into fixed-size uint8 arrays.

Every decoded image comes out as a C-contiguous ``uint8`` array of shape
``(size, size, channels)``:

- Resizing is a plain square resize to ``size x size``: the aspect ratio is NOT preserved (a
  2000x1000 radiograph is squeezed, not padded or cropped). Pillow's bilinear filter widens its
  support when shrinking, so a large downscale averages like an area filter.
- ``channels`` is 1 or 3. Grayscale becomes RGB by repeating the channel; RGB becomes grayscale
  by ITU-R 601-2 luma (Pillow mode "L").
- Alpha is composited on black. Palette, 1-bit, CMYK, YCbCr and LA inputs are converted first.
- More than 8 bits per sample (16-bit grayscale PNG/TIFF, 32-bit and float TIFF, arrays) is
  windowed to 0..255 by min-max over the whole image (all colour channels together, so colours
  keep their balance). A constant image becomes all zeros. (Pillow itself reduces 16-bit RGB
  PNGs to 8 bits per channel.)
- EXIF orientation is applied (any Pillow format that carries it, JPEG above all).
- DICOM: the Modality LUT (rescale slope/intercept or LUT) is applied, then the VOI LUT
  sequence or the first Window Center/Width (LINEAR, LINEAR_EXACT, SIGMOID), else min-max;
  MONOCHROME1 is inverted after windowing so that bone stays bright; PALETTE COLOR goes
  through its colour LUT; YBR is converted to RGB by pydicom.

Failures raise :class:`ImageError` only, with ``kind`` one of ``IMAGE_ERROR_KINDS``. Memory
is bounded: declared dimensions are checked against ``max_pixels`` before any pixel is
decoded, and a deflated DICOM is inflated only up to a bound derived from ``max_pixels``.
Pure code: no file or network I/O. Shared pieces live in :mod:`medray.workers.pixels`,
DICOM pixel decoding in :mod:`medray.workers.dicom_pixels`.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from medray.workers.dicom_pixels import decode_dicom
from medray.workers.errors import ConfigError, ImageError
from medray.workers.pixels import (
    DEFAULT_MAX_PIXELS,
    IMAGE_ERROR_KINDS,
    DecodedImage,
    array_to_pixels,
    check_dims,
    check_target,
    finish,
    pixels_from_bytes,
    scale_to_uint8,
    short_message,
)

if TYPE_CHECKING:
    from medray.workers.deid import Deidentifier

logger = logging.getLogger(__name__)

FORMATS = ("jpeg", "png", "dicom", "bmp", "tiff", "gif", "webp", "array")
# In the shard-reuse key: bump it when decoded pixels or their metadata change, so images
# staged by an older decoder are decoded again. 3: colour JPEGs staged gray take libjpeg's
# luma (draft mode "L") instead of Pillow's RGB -> L, at most a level or two apart.
DECODER_VERSION = "medray-decode-3"
_PIL_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "bmp": "BMP",
    "tiff": "TIFF",
    "gif": "GIF",
    "webp": "WEBP",
}

# -- format sniffing -------------------------------------------------------------------------

_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
    b"UR US UT UV".split()
)
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


def _looks_like_raw_dicom(data: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble: it starts with a group 0002/0008 tag."""
    if len(data) < 8:
        return False
    for order in ("<", ">"):
        group, _element = struct.unpack_from(order + "HH", data, 0)
        if group not in (0x0002, 0x0008):
            continue
        if data[4:6] in _DICOM_VRS:  # explicit VR
            return True
        if order == "<":  # implicit VR little endian: a 4-byte length that fits the data
            (length,) = struct.unpack_from("<I", data, 4)
            if length < 1024 and 8 + length <= len(data):
                return True
    return False


def sniff_format(data: bytes) -> str:
    """The image format named by the magic bytes, or ``"unknown"``."""
    head = bytes(data[:132])
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM") and len(head) >= 18:
        (dib_size,) = struct.unpack_from("<I", head, 14)
        if dib_size in _BMP_HEADER_SIZES:
            return "bmp"
    if _looks_like_raw_dicom(head):
        return "dicom"
    return "unknown"


# -- Pillow formats --------------------------------------------------------------------------


def _looks_truncated(data: bytes, fmt: str) -> bool:
    tail = data[-64:]
    if fmt == "png":
        return b"IEND" not in tail
    if fmt == "jpeg":
        return b"\xff\xd9" not in tail
    if fmt == "gif":
        return not data.rstrip(b"\x00").endswith(b";")
    return False


def _failure_kind(exc: BaseException, data: bytes, fmt: str) -> str:
    if isinstance(exc, Image.DecompressionBombError | MemoryError):
        return "too_large"
    if isinstance(exc, EOFError) or "truncat" in str(exc).lower() or _looks_truncated(data, fmt):
        return "truncated"
    return "invalid"


def _composite_on_black(img: Image.Image, base_mode: str) -> Image.Image:
    with_alpha = img.convert(base_mode + "A") if img.mode not in ("LA", "RGBA") else img
    out = Image.new(base_mode, with_alpha.size, 0)
    out.paste(with_alpha.convert(base_mode), mask=with_alpha.getchannel("A"))
    return out


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> an 8-bit "L" or "RGB" image."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        img = img.convert("RGBA" if has_alpha else "RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("LA", "La"):
        return _composite_on_black(img, "L")
    if mode in ("RGBA", "RGBa"):
        return _composite_on_black(img, "RGB")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return img.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(scale_to_uint8(np.asarray(img)))
    raise ImageError(f"unsupported image mode {mode!r}", "unsupported")


def _decode_pillow(
    data: bytes, fmt: str, size: int, channels: int, max_pixels: int
) -> DecodedImage:
    what = f"the {fmt.upper()} image"
    try:
        # Our own max_pixels check below is the limit; Pillow's warning would only be noise.
        # Its hard DecompressionBombError (2 x MAX_IMAGE_PIXELS) still stops absurd headers.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]])
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{what} declares too many pixels: {short_message(exc)}", "too_large"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken headers
        kind = _failure_kind(exc, data, fmt)
        raise ImageError(f"cannot read {what} header: {short_message(exc)}", kind) from exc
    with img:
        width, height = img.size
        check_dims(width, height, max_pixels, what)
        try:
            animated = bool(getattr(img, "is_animated", False))
        except Exception:  # noqa: BLE001 - a broken second frame shows up again in load()
            animated = False
        if animated:
            raise ImageError(
                f"{what} has several frames; multi-frame images are not supported",
                "multi_frame",
            )
        source_mode = img.mode
        try:
            if fmt == "jpeg":
                # libjpeg decodes at 1/2, 1/4 or 1/8 scale while staying >= size: big
                # radiographs decode several times faster and in a fraction of the memory.
                # Staged gray, a colour JPEG decodes its luma only: no chroma upsampling,
                # no colour conversion (ITU-R 601 luma either way).
                img.draft("L" if channels == 1 and img.mode == "RGB" else img.mode,
                          (size, size))
            img.load()
        except Exception as exc:  # noqa: BLE001
            kind = _failure_kind(exc, data, fmt)
            raise ImageError(f"cannot decode {what}: {short_message(exc)}", kind) from exc
        before = img.size
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not worth losing the image
            logger.debug("ignoring unreadable EXIF orientation")
        if img.size != before:
            width, height = height, width
        try:
            eight = _to_8bit(img)
        except (OSError, ValueError) as exc:  # Pillow's conversions of a decoded image
            raise ImageError(f"cannot convert {what}: {short_message(exc)}", "invalid") from exc
        pixels = finish(eight, size, channels)
    return DecodedImage(
        pixels=pixels,
        original_height=height,
        original_width=width,
        format=fmt,
        metadata={"mode": source_mode},
        patient_ref=None,
    )


# -- entry point -----------------------------------------------------------------------------


def decode_image(
    data: bytes,
    *,
    size: int,
    channels: int,
    name: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    deidentifier: Deidentifier | None = None,
) -> DecodedImage:
    """Decode one image from bytes into a :class:`DecodedImage` of ``size x size x channels``.

    ``name`` (the source file name) is only a hint: a ``.dcm``/``.dicom`` name lets a DICOM
    data set that has neither preamble nor a recognisable first tag be tried as DICOM. It never
    appears in error messages (file names can carry patient names). ``deidentifier`` is
    accepted for forward compatibility and unused: pixels need no de-identification here and
    the de-identified data set comes from ``deid.deidentify_bytes``.

    Raises ImageError (``kind`` in IMAGE_ERROR_KINDS) for any bad input and ConfigError for a
    bad ``size``, ``channels`` or ``max_pixels``.
    """
    del deidentifier  # see docstring
    check_target(size, channels)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if data is None or len(data) == 0:
        raise ImageError("the image is empty (0 bytes)", "empty")
    if not isinstance(data, bytes):
        data = bytes(data)
    fmt = sniff_format(data)
    if fmt == "unknown" and name.lower().endswith((".dcm", ".dicom")):
        fmt = "dicom"
    if fmt == "unknown":
        raise ImageError(
            "not a recognised image (expected JPEG, PNG, DICOM, BMP, TIFF, GIF or WebP)",
            "not_an_image",
        )
    # Only the third-party calls that read the input turn their exceptions into ImageError
    # (each at its call); an exception of medray's own code is a bug and is not disguised.
    try:
        if fmt == "dicom":
            return decode_dicom(data, size, channels, max_pixels)
        return _decode_pillow(data, fmt, size, channels, max_pixels)
    except MemoryError as exc:
        raise ImageError("out of memory decoding the image", "too_large") from exc


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMATS",
    "IMAGE_ERROR_KINDS",
    "DecodedImage",
    "array_to_pixels",
    "decode_image",
    "pixels_from_bytes",
    "sniff_format",
]
