"""Fuzzing decode_image: random and mutated bytes give a DecodedImage or an ImageError of a
documented kind, nothing else, and no hang (each example has a 2 s deadline).

decode_image has no blanket ``except Exception -> ImageError`` (issue #14): only the
third-party calls that read the input translate their exceptions, so an exception raised by
medray's own code escapes and fails this test (``test_a_bug_in_medray_code_is_not_disguised``
plants one to show it)."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from medray.workers import dicom_pixels, imaging
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
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "SC_rgb_small_odd_jpeg.dcm", "image_dfl.dcm",
                 "SC_rgb_rle.dcm", "MR_small_jp2klossless.dcm", "JPEGLSNearLossless_08.dcm",
                 "SC_rgb_jpeg_gdcm.dcm", "rtdose_rle_1frame.dcm"):
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


def test_seeds_decode_or_fail_for_a_documented_reason() -> None:
    decoded = 0
    for data in seeds():
        try:
            decode_image(data, size=16, channels=3)
            decoded += 1
        except ImageError as err:  # a decoder plugin missing here (JPEG 2000, JPEG-LS)
            assert err.kind == "unsupported", err.message
    assert decoded >= 10


@pytest.mark.parametrize("target, seed", [(imaging, 0), (dicom_pixels, 7)])
def test_a_bug_in_medray_code_is_not_disguised(target, seed, monkeypatch) -> None:
    """Plant a bug in the conversion both paths share: check() must fail with it, not see an
    ImageError (the fuzz above could not fail if every exception became one)."""

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug in medray")

    monkeypatch.setattr(target, "finish", broken)
    with pytest.raises(KeyError, match="a bug in medray"):
        check(seeds()[seed])
