"""What every decoder shares: the decoded image type, the failure kinds, the checks made before
any pixel is decoded, the conversion of deeper samples to uint8 and the final resize; and
the decoding of raw arrays (MedMNIST ``.npz`` rows, pixels stored in a shard).

See :mod:`medray.workers.imaging` for the output contract. Pure code: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from medray.workers.errors import ConfigError, ImageError

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
MAX_SIZE = 8192  # output side; larger is a configuration mistake, not an image problem
DEFAULT_MAX_PIXELS = 50_000_000
_BASE_INPUT_BYTES = 16 * 1024 * 1024
_BYTES_PER_PIXEL_BOUND = 6  # 3 samples x 16 bits: the largest common uncompressed pixel
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
    burned_in: str | None = None     # why the pixels may carry burned-in text (DICOM)
    instance_ref: str | None = None  # the raw SOP Instance UID (never store it: remap it)
    # raw DICOM PatientAge / PatientSex: kept only when de-identification retains them
    characteristics: dict[str, str] = field(default_factory=dict)


# -- shared helpers --------------------------------------------------------------------------


def max_input_bytes(max_pixels: int) -> int:
    """Largest input read into memory whole (a file, an .npz row, an inflated DICOM): an
    uncompressed image at the pixel limit, plus room for its headers."""
    return _BASE_INPUT_BYTES + _BYTES_PER_PIXEL_BOUND * int(max_pixels)



def short_message(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def check_target(size: int, channels: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
        raise ConfigError(f"image size must be an integer in 1..{MAX_SIZE}, got {size!r}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def check_dims(width: int, height: int, max_pixels: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} declares an empty size {width}x{height}", "invalid")
    if width * height > max_pixels:
        raise ImageError(
            f"{what} is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels}; raise max_pixels if such images are expected",
            "too_large",
        )


def scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """uint8 as is, bool to 0/255, anything else min-max over the whole array to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    return minmax_to_uint8(arr)


def minmax_to_uint8(arr: np.ndarray) -> np.ndarray:
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


def finish(img: Image.Image, size: int, channels: int) -> np.ndarray:
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
    check_target(size, channels)
    try:
        a = np.asarray(arr)
    except Exception as exc:  # noqa: BLE001 - anything numpy cannot read is not an image
        raise ImageError(f"not an array: {short_message(exc)}", "invalid") from exc
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
        color = scale_to_uint8(a)
        if alpha is not None:
            weight = _alpha_unit(alpha)
            if color.ndim == 3:
                weight = weight[:, :, None]
            color = np.rint(color.astype(np.float32) * weight).astype(np.uint8)
        return finish(Image.fromarray(np.ascontiguousarray(color)), size, channels)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError(f"out of memory converting a {a.shape} array", "too_large") from exc
    except Exception as exc:  # noqa: BLE001
        raise ImageError(
            f"cannot convert the pixel array: {short_message(exc)}", "invalid"
        ) from exc


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
