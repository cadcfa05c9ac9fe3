"""Decode the pixels of one DICOM instance into the common uint8 output.

The Modality LUT (rescale slope/intercept or LUT) is applied, then the VOI LUT sequence or the
first Window Center/Width (LINEAR, LINEAR_EXACT, SIGMOID), else min-max; MONOCHROME1 is
inverted after windowing so that bone stays bright; PALETTE COLOR goes through its colour LUT;
YBR is converted to RGB by pydicom. Declared dimensions, of the data set and of a compressed
frame's codestream (``codestreams``), are checked against ``max_pixels`` before any pixel is
decoded. Pure code: no I/O.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from medray.workers.codestreams import check_frame
from medray.workers.deid import burned_in_reason
from medray.workers.dicom_io import read_dicom, safe_metadata
from medray.workers.errors import ImageError
from medray.workers.pixels import (
    DecodedImage,
    check_dims,
    finish,
    minmax_to_uint8,
    scale_to_uint8,
    short_message,
)

logger = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONO = ("MONOCHROME1", "MONOCHROME2")
_COLOR = frozenset(
    {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"}
)


def _int(value: object, default: int, keyword: str = "attribute") -> int:
    """An integer attribute; ImageError (``invalid``) when the file holds something else."""
    if value is None or value == "":
        return default
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise ImageError(f"the DICOM {keyword} is not an integer: {short_message(exc)}",
                         "invalid") from exc


def _first_float(value: object) -> float | None:
    """The first number of a DS attribute; None when absent or not a finite number."""
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple | MultiValue):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
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
    bits = _int(ds.get("BitsAllocated"), 0, "Bits Allocated")
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
    return ImageError(f"cannot decode '{ts.name}' DICOM pixel data: {short_message(exc)}", kind)


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


# what pydicom's LUT functions raise on a malformed LUT or rescale attribute
_LUT_ERRORS = (AttributeError, IndexError, KeyError, TypeError, ValueError, OverflowError)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The first VOI LUT of the sequence applied, in 0..1; None when it cannot be used."""
    try:
        descriptor = [int(v) for v in ds.VOILUTSequence[0].LUTDescriptor]
        entries, first = descriptor[0] or 65536, descriptor[1]
        ints = np.rint(values).astype(np.int32) if values.dtype.kind == "f" else values
        out = apply_voi(ints.astype(np.int32, copy=False), ds)
        # scale by what the LUT really outputs: descriptors often overstate the bit depth
        table = apply_voi(np.arange(first, first + entries, dtype=np.int32), ds)
    except _LUT_ERRORS as exc:  # a malformed VOI LUT: fall back to min-max
        logger.debug("ignoring an unusable VOI LUT: %s", short_message(exc))
        return None
    lo, hi = float(table.min()), float(table.max())
    if hi <= lo:
        return None
    return (out.astype(np.float32) - lo) / (hi - lo)


def _voi_unit(values: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """The VOI LUT or window applied, in 0..1; None when the data set defines neither (or
    only broken ones: min-max then)."""
    if ds.get("VOILUTSequence"):
        return _voi_lut(values, ds)
    center = _first_float(ds.get("WindowCenter"))
    width = _first_float(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    return _window(values, center, width, function)


def _palette_to_uint8(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        return rgb
    if rgb.dtype.kind == "u" and int(rgb.max()) > 255:
        return (rgb >> (8 * (rgb.dtype.itemsize - 1))).astype(np.uint8)
    if rgb.dtype.kind in "iu" and int(rgb.min()) >= 0 and int(rgb.max()) <= 255:
        return rgb.astype(np.uint8)
    return scale_to_uint8(rgb)


def _dicom_to_uint8(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except _LUT_ERRORS as exc:
            raise ImageError(f"unusable palette colour LUT: {short_message(exc)}",
                             "invalid") from exc
        return _palette_to_uint8(rgb)
    if photometric in _COLOR:
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ImageError(f"{photometric} pixel data has shape {arr.shape}", "invalid")
        return scale_to_uint8(arr)
    if arr.ndim != 2:
        raise ImageError(f"{photometric} pixel data has shape {arr.shape}", "invalid")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError("the DICOM pixel values contain NaN or infinity", "invalid")
    try:
        values = apply_modality_lut(arr, ds)
    except _LUT_ERRORS as exc:
        raise ImageError(f"unusable modality LUT or rescale: {short_message(exc)}",
                         "invalid") from exc
    unit = _voi_unit(values, ds)
    # no window in the file: min-max, whatever the bit depth
    u8 = minmax_to_uint8(values) if unit is None else np.rint(unit * 255.0).astype(np.uint8)
    if photometric == "MONOCHROME1":
        u8 = np.uint8(255) - u8
    return u8


def decode_dicom(data: bytes, size: int, channels: int, max_pixels: int) -> DecodedImage:
    ds = read_dicom(data, max_pixels=max_pixels)
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise ImageError("the DICOM file has no pixel data (not an image object)", "no_pixel_data")
    frames = _int(ds.get("NumberOfFrames"), 1, "Number of Frames")
    if frames > 1:
        raise ImageError(
            f"the DICOM image has {frames} frames; multi-frame DICOM (cine, volumes, "
            "tomosynthesis) is not supported: split it into single-frame images",
            "multi_frame",
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageError("the DICOM image has no Rows/Columns", "invalid")
    rows, cols = _int(ds.Rows, 0, "Rows"), _int(ds.Columns, 0, "Columns")
    check_dims(cols, rows, max_pixels, "the DICOM image")
    spp = _int(ds.get("SamplesPerPixel"), 1, "Samples per Pixel")
    if spp not in (1, 3):
        raise ImageError(f"DICOM Samples per Pixel {spp} is not supported", "unsupported")
    default_photometric = "MONOCHROME2" if spp == 1 else "RGB"
    photometric = str(ds.get("PhotometricInterpretation") or default_photometric).strip().upper()
    if photometric not in _MONO and photometric not in _COLOR and photometric != "PALETTE COLOR":
        raise ImageError(
            f"DICOM Photometric Interpretation {photometric!r} is not supported", "unsupported"
        )
    ts = _transfer_syntax(ds)
    pixel_elem = ds.data_element("PixelData")
    if pixel_elem is not None and pixel_elem.is_undefined_length:  # encapsulated: compressed
        # a decoder allocates what the codestream declares: check that before it runs
        check_frame(pixel_elem.value or b"", ts, rows, cols, spp,
                    _int(ds.get("BitsAllocated"), 8, "Bits Allocated"), max_pixels)
    if _check_decodable(ts):
        _check_native_length(ds, rows, cols, spp, photometric)
    try:
        arr = pixel_array(ds)
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many types
        raise _decode_failure(exc, ts) from exc
    u8 = _dicom_to_uint8(arr, ds, photometric)
    pixels = finish(Image.fromarray(np.ascontiguousarray(u8)), size, channels)
    raw_id = ds.get("PatientID")
    patient_ref = str(raw_id) if raw_id not in (None, "") else None
    instance = str(ds.get("SOPInstanceUID") or "") or None
    return DecodedImage(
        pixels=pixels,
        original_height=rows,
        original_width=cols,
        format="dicom",
        metadata=safe_metadata(ds),
        patient_ref=patient_ref,
        burned_in=burned_in_reason(ds),
        instance_ref=instance,
        characteristics={k: str(ds.get(k) or "").strip() for k in ("PatientAge", "PatientSex")},
    )
