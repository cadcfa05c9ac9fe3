"""Fuzzing decode_image: random and mutated bytes give a DecodedImage or an ImageError, nothing
else, and no hang (each example has a 2 s deadline)."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from medray.workers.errors import ImageError
from medray.workers.imaging import IMAGE_ERROR_KINDS, DecodedImage, decode_image

# pydicom and Pillow warn loudly about the garbage they are fed here; that is the point.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FUZZ = settings(
    max_examples=200,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
MAX_PIXELS = 4_000_000  # keeps a mutated header from asking for a large (if bounded) buffer


@cache
def seeds() -> tuple[bytes, ...]:
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, size=(24, 24, 3), dtype=np.uint8))
    gray16 = Image.fromarray(rng.integers(0, 65535, size=(16, 16), dtype=np.uint16))

    def enc(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        return buf.getvalue()

    out = [
        enc(rgb, "PNG"),
        enc(gray16, "PNG"),
        enc(rgb, "JPEG", quality=80),
        enc(rgb.convert("P"), "GIF"),
        enc(rgb, "BMP"),
        enc(rgb, "TIFF"),
        enc(rgb, "WEBP"),
    ]
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "SC_rgb_small_odd_jpeg.dcm", "image_dfl.dcm"):
        path = get_testdata_file(name)
        assert path is not None
        with open(path, "rb") as fh:
            out.append(fh.read())
    return tuple(out)


def check(data: bytes) -> None:
    try:
        result = decode_image(data, size=16, channels=3, max_pixels=MAX_PIXELS)
    except ImageError as err:
        assert err.kind in IMAGE_ERROR_KINDS
        return
    assert isinstance(result, DecodedImage)
    assert result.pixels.shape == (16, 16, 3) and result.pixels.dtype == np.uint8


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(max_size=16))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(
    st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"II*\x00", b"BM"]),
    st.binary(max_size=512),
)
def test_magic_then_garbage(magic: bytes, tail: bytes) -> None:
    check(magic + tail)


@FUZZ
@given(st.binary(max_size=256))
def test_dicom_preamble_then_garbage(tail: bytes) -> None:
    check(b"\x00" * 128 + b"DICM" + tail)


@FUZZ
@given(mutated())
def test_mutated_valid_files(data: bytes) -> None:
    check(data)


def test_seeds_decode() -> None:
    for data in seeds():
        check(data)
        assert isinstance(decode_image(data, size=16, channels=3), DecodedImage)
