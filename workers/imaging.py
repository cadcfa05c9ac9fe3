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
Pure code: no file or network I/O.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medray.workers.deid import DEFAULT_MAX_PIXELS, read_dicom, safe_metadata
from medray.workers.errors import ConfigError, ImageError

if TYPE_CHECKING:
    from medray.workers.deid import Deidentifier

logger = logging.getLogger(__name__)

IMAGE_ERROR_KINDS = frozenset(
    {
        "empty",
        "truncated",
        "not_an_image",
        "unsupported",
        "too_large",
        "multi_frame",
        "no_pixel_data",
        "invalid",
    }
)
FORMATS = ("jpeg", "png", "dicom", "bmp", "tiff", "gif", "webp", "array")
MAX_SIZE = 8192  # output side; larger is a configuration mistake, not an image problem

_PIL_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "bmp": "BMP",
    "tiff": "TIFF",
    "gif": "GIF",
    "webp": "WEBP",
}
_MAX_MESSAGE = 300


@dataclass(frozen=True)
class DecodedImage:
    """One decoded image, resized; ``patient_ref`` is the raw DICOM PatientID (never store it:
    hash it with ``Deidentifier.patient_key``)."""

    pixels: np.ndarray
    original_height: int
    original_width: int
    format: str
    metadata: dict[str, str | int | float]
    patient_ref: str | None


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


# -- shared helpers --------------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _check_target(size: int, channels: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
        raise ConfigError(f"image size must be an integer in 1..{MAX_SIZE}, got {size!r}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def _check_dims(width: int, height: int, max_pixels: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} declares an empty size {width}x{height}", "invalid")
    if width * height > max_pixels:
        raise ImageError(
            f"{what} is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels}; raise max_pixels if such images are expected",
            "too_large",
        )


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """uint8 as is, bool to 0/255, anything else min-max over the whole array to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    return _minmax_to_uint8(arr)


def _minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max over the whole array to 0..255 (a constant array becomes zeros)."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError("the pixel values contain NaN or infinity", "invalid")
    lo = float(arr.min())
    hi = float(arr.max())
    span = hi - lo
    if not span > 0 or not math.isfinite(span):
        return np.zeros(arr.shape, dtype=np.uint8)
    # float32 is exact for 8/16-bit integers and halves the memory of float64
    scaled = arr.astype(np.float32 if arr.dtype.itemsize <= 2 else np.float64)
    np.subtract(scaled, lo, out=scaled)  # in place: one working copy, whatever the size
    np.multiply(scaled, 255.0 / span, out=scaled)
    np.rint(scaled, out=scaled)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _finish(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """An 8-bit "L" or "RGB" image -> C-contiguous uint8 (size, size, channels)."""
    if channels == 1 and img.mode != "L":
        img = img.convert("L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    arr = np.array(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
        if channels == 3:
            arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


# -- arrays ----------------------------------------------------------------------------------


def _alpha_unit(alpha: np.ndarray) -> np.ndarray:
    if alpha.dtype == np.bool_:
        return alpha.astype(np.float32)
    if alpha.dtype.kind in "iu":
        return np.clip(alpha.astype(np.float32) / np.iinfo(alpha.dtype).max, 0.0, 1.0)
    return np.clip(alpha.astype(np.float32), 0.0, 1.0)


def array_to_pixels(arr: np.ndarray, *, size: int, channels: int) -> np.ndarray:
    """Any 2-D (H, W) or 3-D (H, W, C) numeric array, C in 1..4, -> uint8 (size, size, channels).

    uint8 is taken as is; other dtypes are min-max windowed (see the module docstring). C=2 and
    C=4 are gray+alpha and RGBA: alpha (0..1 for floats, the dtype's range for integers) is
    composited on black. Raises ImageError for empty, non-numeric, NaN/inf or wrongly shaped
    input.
    """
    _check_target(size, channels)
    try:
        a = np.asarray(arr)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot read is not an image
        raise ImageError(f"not an array: {_short(exc)}", "invalid") from exc
    if a.dtype.kind not in "biuf":
        raise ImageError(f"pixel arrays must be numeric, got dtype {a.dtype}", "invalid")
    if a.size == 0:
        raise ImageError(f"the pixel array is empty (shape {a.shape})", "empty")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (2, 3, 4))):
        raise ImageError(
            f"pixel arrays must be (H, W) or (H, W, C) with C in 1..4, got shape {a.shape}",
            "invalid",
        )
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImageError("the pixel array contains NaN or infinity", "invalid")
    try:
        alpha = None
        if a.ndim == 3 and a.shape[2] in (2, 4):
            a, alpha = a[:, :, :-1], a[:, :, -1]
            if a.shape[2] == 1:
                a = a[:, :, 0]
        color = _scale_to_uint8(a)
        if alpha is not None:
            weight = _alpha_unit(alpha)
            if color.ndim == 3:
                weight = weight[:, :, None]
            color = np.rint(color.astype(np.float32) * weight).astype(np.uint8)
        return _finish(Image.fromarray(np.ascontiguousarray(color)), size, channels)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(f"out of memory converting a {a.shape} array", "too_large") from exc
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"cannot convert the pixel array: {_short(exc)}", "invalid") from exc


def pixels_from_bytes(buf: bytes, height: int, width: int, channels: int) -> np.ndarray:
    """The inverse of ``arr.tobytes()`` for uint8 (height, width, channels) arrays.

    Zero-copy: the result is a read-only view of ``buf``; copy it before writing in place.
    """
    for label, value in (("height", height), ("width", width), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
            raise ImageError(f"{label} must be a positive integer, got {value!r}", "invalid")
    expected = int(height) * int(width) * int(channels)
    try:
        view = memoryview(buf)
    except TypeError as exc:
        raise ImageError(
            f"pixel buffer must be bytes, got {type(buf).__name__}", "invalid"
        ) from exc
    if view.nbytes != expected:
        raise ImageError(
            f"pixel buffer has {view.nbytes} bytes, expected {height}x{width}x{channels} = "
            f"{expected}",
            "invalid",
        )
    return np.frombuffer(view.cast("B"), dtype=np.uint8).reshape(height, width, channels)


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
        return Image.fromarray(_scale_to_uint8(np.asarray(img)))
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
        raise ImageError(f"{what} declares too many pixels: {_short(exc)}", "too_large") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for broken headers
        kind = _failure_kind(exc, data, fmt)
        raise ImageError(f"cannot read {what} header: {_short(exc)}", kind) from exc
    with img:
        width, height = img.size
        _check_dims(width, height, max_pixels, what)
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
        if fmt == "jpeg":
            # libjpeg decodes at 1/2, 1/4 or 1/8 scale while staying >= size: big radiographs
            # decode several times faster and in a fraction of the memory.
            img.draft(img.mode, (size, size))
        try:
            img.load()
        except Exception as exc:  # noqa: BLE001
            kind = _failure_kind(exc, data, fmt)
            raise ImageError(f"cannot decode {what}: {_short(exc)}", kind) from exc
        before = img.size
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:  # noqa: BLE001 - a broken EXIF block is not worth losing the image
            logger.debug("ignoring unreadable EXIF orientation")
        if img.size != before:
            width, height = height, width
        pixels = _finish(_to_8bit(img), size, channels)
    return DecodedImage(
        pixels=pixels,
        original_height=height,
        original_width=width,
        format=fmt,
        metadata={"mode": source_mode},
        patient_ref=None,
    )


# -- DICOM -----------------------------------------------------------------------------------

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOR = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"}
)


def _int(value: object, default: int) -> int:
    if value is None or value == "":
        return default
    return int(value)  # type: ignore[call-overload]


def _first_float(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple | MultiValue):
        if len(value) == 0:  # type: ignore[arg-type]
            return None
        value = value[0]  # type: ignore[index]
    number = float(value)  # type: ignore[arg-type]
    return number if math.isfinite(number) else None


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    ts = meta.get("TransferSyntaxUID")
    if not ts:  # no file-meta header: use the encoding pydicom detected while reading
        implicit, little = ds.original_encoding
        if implicit is None or implicit:
            ts = ImplicitVRLittleEndian
        else:
            ts = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        meta.TransferSyntaxUID = ts
    return UID(str(ts))


def _check_decodable(ts: UID) -> bool:
    """True for native (uncompressed) pixel data; ImageError when no decoder can read it."""
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise ImageError(
            f"transfer syntax '{ts.name}' ({ts}) is not supported: no pixel data decoder exists",
            "unsupported",
        ) from exc
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise ImageError(
            f"transfer syntax '{ts.name}' ({ts}) is not supported here: its decoder is not "
            f"installed ({needs})",
            "unsupported",
        )
    return bool(decoder.is_native)


def _check_native_length(ds: Dataset, rows: int, cols: int, spp: int, photometric: str) -> None:
    bits = _int(ds.get("BitsAllocated"), 0)
    if bits not in (1, 8, 16, 32, 64):
        raise ImageError(f"unsupported DICOM Bits Allocated {bits}", "unsupported")
    samples = rows * cols * spp
    expected = (samples + 7) // 8 if bits == 1 else samples * (bits // 8)
    if photometric == "YBR_FULL_422":
        expected = expected * 2 // 3
    keyword = next(k for k in _PIXEL_KEYWORDS if k in ds)
    actual = len(ds[keyword].value or b"")
    if actual < expected:
        raise ImageError(
            f"DICOM pixel data has {actual} bytes, {expected} expected: the file is truncated",
            "truncated",
        )


def _decode_failure(exc: Exception, ts: UID) -> ImageError:
    text = str(exc).lower()
    if "not support" in text or "unsupported" in text:
        kind = "unsupported"
    elif "exceeds limit" in text or "decompression bomb" in text:
        kind = "too_large"
    elif "truncat" in text or "less than expected" in text:
        kind = "truncated"
    else:
        kind = "invalid"
    return ImageError(f"cannot decode '{ts.name}' DICOM pixel data: {_short(exc)}", kind)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """PS3.3 C.11.2.1.2/C.11.2.1.3 VOI windowing into 0..1; None if the window is invalid."""
    x = values.astype(np.float32, copy=False)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if function == "SIGMOID":
            if width <= 0:
                return None
            unit = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
        elif function == "LINEAR_EXACT":
            if width <= 0:
                return None
            unit = (x - center) / width + 0.5
        else:  # LINEAR, the default
            if width < 1:
                return None
            if width == 1:
                unit = (x > center - 0.5).astype(np.float32)
            else:
                unit = (x - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(unit, 0.0, 1.0)


def _voi_unit(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The VOI LUT or window applied, in 0..1; None when the data set defines neither."""
    try:
        sequence = ds.get("VOILUTSequence")
        if sequence:
            descriptor = [int(v) for v in sequence[0].LUTDescriptor]
            entries, first = descriptor[0] or 65536, descriptor[1]
            ints = np.rint(values).astype(np.int32) if values.dtype.kind == "f" else values
            out = apply_voi(ints.astype(np.int32, copy=False), ds)
            # scale by what the LUT really outputs: descriptors often overstate the bit depth
            table = apply_voi(np.arange(first, first + entries, dtype=np.int32), ds)
            lo, hi = float(table.min()), float(table.max())
            if hi <= lo:
                return None
            return (out.astype(np.float32) - lo) / (hi - lo)
        center = _first_float(ds.get("WindowCenter"))
        width = _first_float(ds.get("WindowWidth"))
        if center is None or width is None:
            return None
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
        return _window(values, center, width, function)
    except Exception as exc:  # noqa: BLE001 - a broken window falls back to min-max
        logger.debug("ignoring unusable VOI LUT/window: %s", _short(exc))
        return None


def _palette_to_uint8(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return rgb
    if rgb.dtype.kind == "u" and int(rgb.max()) > 255:
        return (rgb >> (8 * (rgb.dtype.itemsize - 1))).astype(np.uint8)
    if rgb.dtype.kind in "iu" and int(rgb.min()) >= 0 and int(rgb.max()) <= 255:
        return rgb.astype(np.uint8)
    return _scale_to_uint8(rgb)


def _dicom_to_uint8(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        return _palette_to_uint8(apply_color_lut(arr, ds))
    if photometric in _COLOR:
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ImageError(f"{photometric} pixel data has shape {arr.shape}", "invalid")
        return _scale_to_uint8(arr)
    if arr.ndim != 2:
        raise ImageError(f"{photometric} pixel data has shape {arr.shape}", "invalid")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError("the DICOM pixel values contain NaN or infinity", "invalid")
    values = apply_modality_lut(arr, ds)
    unit = _voi_unit(values, ds)
    # no window in the file: min-max, whatever the bit depth
    u8 = _minmax_to_uint8(values) if unit is None else np.rint(unit * 255.0).astype(np.uint8)
    if photometric == "MONOCHROME1":
        u8 = np.uint8(255) - u8
    return u8


def _decode_dicom(data: bytes, size: int, channels: int, max_pixels: int) -> DecodedImage:
    ds = read_dicom(data, max_pixels=max_pixels)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise ImageError("the DICOM file has no pixel data (not an image object)", "no_pixel_data")
    frames = _int(ds.get("NumberOfFrames"), 1)
    if frames > 1:
        raise ImageError(
            f"the DICOM image has {frames} frames; multi-frame DICOM (cine, volumes, "
            "tomosynthesis) is not supported: split it into single-frame images",
            "multi_frame",
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageError("the DICOM image has no Rows/Columns", "invalid")
    rows, cols = _int(ds.Rows, 0), _int(ds.Columns, 0)
    _check_dims(cols, rows, max_pixels, "the DICOM image")
    spp = _int(ds.get("SamplesPerPixel"), 1)
    if spp not in (1, 3):
        raise ImageError(f"DICOM Samples per Pixel {spp} is not supported", "unsupported")
    default_photometric = "MONOCHROME2" if spp == 1 else "RGB"
    photometric = str(ds.get("PhotometricInterpretation") or default_photometric).strip().upper()
    if photometric not in _MONO and photometric not in _COLOR and photometric != "PALETTE COLOR":
        raise ImageError(
            f"DICOM Photometric Interpretation {photometric!r} is not supported", "unsupported"
        )
    ts = _transfer_syntax(ds)
    if _check_decodable(ts):
        _check_native_length(ds, rows, cols, spp, photometric)
    try:
        arr = pixel_array(ds)
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many types
        raise _decode_failure(exc, ts) from exc
    u8 = _dicom_to_uint8(arr, ds, photometric)
    pixels = _finish(Image.fromarray(np.ascontiguousarray(u8)), size, channels)
    raw_id = ds.get("PatientID")
    patient_ref = str(raw_id) if raw_id not in (None, "") else None
    return DecodedImage(
        pixels=pixels,
        original_height=rows,
        original_width=cols,
        format="dicom",
        metadata=safe_metadata(ds),
        patient_ref=patient_ref,
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
    _check_target(size, channels)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")
    if data is None or len(data) == 0:
        raise ImageError("the image is empty (0 bytes)", "empty")
    try:
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
        if fmt == "dicom":
            return _decode_dicom(data, size, channels, max_pixels)
        return _decode_pillow(data, fmt, size, channels, max_pixels)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError("out of memory decoding the image", "too_large") from exc
    except Exception as exc:  # noqa: BLE001 - the contract: ImageError and nothing else
        raise ImageError(f"cannot decode the image: {_short(exc)}", "invalid") from exc


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
