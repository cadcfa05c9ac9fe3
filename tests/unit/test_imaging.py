"""Decoding real images (made with Pillow and pydicom, or pydicom's bundled test files)."""

from __future__ import annotations

import io
import struct
import time
import zlib
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image, JpegImagePlugin
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medray.workers.errors import ConfigError, ImageError
from medray.workers.imaging import (
    IMAGE_ERROR_KINDS,
    DecodedImage,
    array_to_pixels,
    decode_image,
    pixels_from_bytes,
    sniff_format,
)
from tests.support.data import TINY_IDAT, png_claiming

# -- helpers ---------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def quadrant_image(mode: str = "L", size: int = 100) -> Image.Image:
    """Black image with a bright top-left quadrant."""
    arr = np.zeros((size, size), dtype=np.uint8)
    arr[: size // 2, : size // 2] = 230
    img = Image.fromarray(arr)
    return img if mode == "L" else img.convert(mode)


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR (valid CRC) claims width x height, with a tiny IDAT."""
    return png_claiming(width, height, TINY_IDAT)


def decode(data: bytes, size: int = 32, channels: int = 3, **kwargs: Any) -> DecodedImage:
    result = decode_image(data, size=size, channels=channels, **kwargs)
    assert isinstance(result, DecodedImage)
    assert result.pixels.shape == (size, size, channels)
    assert result.pixels.dtype == np.uint8
    assert result.pixels.flags["C_CONTIGUOUS"]
    return result


def error_of(data: bytes, **kwargs: object) -> ImageError:
    kwargs.setdefault("size", 32)
    kwargs.setdefault("channels", 3)
    with pytest.raises(ImageError) as info:
        decode_image(data, **kwargs)  # type: ignore[arg-type]
    assert info.value.kind in IMAGE_ERROR_KINDS
    return info.value


def dicom_file(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing"
    with open(path, "rb") as fh:
        return fh.read()


def make_dicom(pixels: np.ndarray, *, preamble: bool = True, **attrs: object) -> bytes:
    """A single-frame MONOCHROME2 secondary-capture DICOM file holding ``pixels`` (uint16)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    sop_uid = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "OT"
    ds.PatientID = "SYNTH-1"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=preamble)
    return buf.getvalue()


# -- sniffing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("JPEG", "jpeg"),
        ("PNG", "png"),
        ("BMP", "bmp"),
        ("TIFF", "tiff"),
        ("GIF", "gif"),
        ("WEBP", "webp"),
    ],
)
def test_sniff_pillow_formats(fmt: str, expected: str) -> None:
    assert sniff_format(encode(quadrant_image("RGB"), fmt)) == expected


def test_sniff_dicom_with_and_without_preamble() -> None:
    assert sniff_format(dicom_file("CT_small.dcm")) == "dicom"
    assert sniff_format(dicom_file("ExplVR_LitEndNoMeta.dcm")) == "dicom"
    assert sniff_format(dicom_file("ExplVR_BigEndNoMeta.dcm")) == "dicom"
    assert sniff_format(make_dicom(np.zeros((4, 4)), preamble=False)) == "dicom"


def test_sniff_unknown() -> None:
    assert sniff_format(b"hello, this is text, not an image") == "unknown"
    assert sniff_format(b"") == "unknown"
    assert sniff_format(b"BMW 320i service record") == "unknown"


# -- Pillow formats --------------------------------------------------------------------------


def test_gray_png_to_one_and_three_channels() -> None:
    data = encode(quadrant_image("L"), "PNG")
    gray = decode(data, channels=1)
    assert gray.format == "png"
    assert (gray.original_height, gray.original_width) == (100, 100)
    assert gray.patient_ref is None
    rgb = decode(data, channels=3).pixels
    assert np.array_equal(rgb[:, :, 0], rgb[:, :, 1])
    assert np.array_equal(rgb[:, :, 0], gray.pixels[:, :, 0])


def test_bright_region_stays_bright_after_resize() -> None:
    pixels = decode(encode(quadrant_image("L", size=400), "PNG"), size=32).pixels
    assert pixels[:16, :16].mean() > 200  # the bright top-left quadrant
    assert pixels[16:, 16:].mean() < 10
    assert pixels[:16, 16:].mean() < 10


def test_aspect_ratio_is_not_preserved() -> None:
    arr = np.zeros((50, 200), dtype=np.uint8)
    arr[:, :100] = 255  # left half bright
    result = decode(encode(Image.fromarray(arr), "PNG"), size=20, channels=1)
    assert (result.original_height, result.original_width) == (50, 200)
    assert result.pixels[:, :9].min() > 200 and result.pixels[:, 11:].max() < 50


def test_rgb_jpeg_and_luma_grayscale() -> None:
    red = Image.new("RGB", (64, 48), (255, 0, 0))
    data = encode(red, "JPEG", quality=95)
    rgb = decode(data, channels=3).pixels.astype(int)
    assert rgb[..., 0].mean() > 240 and rgb[..., 1].mean() < 15 and rgb[..., 2].mean() < 15
    gray = decode(data, channels=1).pixels.astype(int)
    assert abs(gray.mean() - 0.299 * 255) < 6  # ITU-R 601 luma of pure red


def test_sixteen_bit_png_is_min_max_windowed() -> None:
    arr = np.full((40, 40), 1000, dtype=np.uint16)
    arr[:, 20:] = 3000
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = decode(data, size=40, channels=1).pixels[:, :, 0]
    assert pixels[:, :19].max() == 0
    assert pixels[:, 21:].min() == 255


def test_palette_with_transparency_composites_on_black() -> None:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    img.paste(1, (10, 0, 20, 20))  # right half: palette index 1 (green)
    data = encode(img, "PNG", transparency=0)  # index 0 (red, left half) is transparent
    pixels = decode(data, size=20).pixels.astype(int)
    assert pixels[:, :9].max() == 0
    assert pixels[:, 11:, 1].min() > 240 and pixels[:, 11:, 0].max() < 15


def test_la_alpha_composites_on_black() -> None:
    lum = Image.new("L", (20, 20), 200)
    alpha = Image.new("L", (20, 20), 0)
    alpha.paste(255, (10, 0, 20, 20))
    data = encode(Image.merge("LA", (lum, alpha)), "PNG")
    pixels = decode(data, size=20, channels=1).pixels[:, :, 0].astype(int)
    assert pixels[:, :9].max() == 0
    assert abs(pixels[:, 11:].mean() - 200) < 2


def test_cmyk_jpeg_converts_to_rgb() -> None:
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    result = decode(data)
    assert result.metadata["mode"] == "CMYK"
    rgb = result.pixels.astype(int)
    assert rgb[..., 0].mean() > 230 and rgb[..., 1].mean() < 30 and rgb[..., 2].mean() < 30


def test_one_bit_and_one_pixel_images() -> None:
    bits = Image.new("1", (8, 8), 1)
    assert decode(encode(bits, "PNG"), size=8, channels=1).pixels.min() == 255
    tiny = decode(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), size=16)
    assert (tiny.original_height, tiny.original_width) == (1, 1)
    assert np.all(tiny.pixels == np.array([10, 20, 30], dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "WEBP"])
def test_other_formats_decode(fmt: str) -> None:
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    pixels = decode(encode(quadrant_image("RGB"), fmt, **kwargs), size=32).pixels
    assert pixels[:16, :16].mean() > 200 and pixels[16:, 16:].mean() < 10


def test_exif_orientation_is_applied() -> None:
    arr = np.zeros((20, 40), dtype=np.uint8)  # stored 40 wide, 20 high
    arr[:, :20] = 255  # left half bright
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    result = decode(encode(img, "JPEG", exif=exif.tobytes(), quality=95), size=20, channels=1)
    assert (result.original_height, result.original_width) == (40, 20)
    pixels = result.pixels[:, :, 0].astype(int)
    assert pixels[:8].mean() > 200 and pixels[12:].mean() < 50  # the bright part is now on top


def test_large_jpeg_decodes_with_draft() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 40, size=(800, 1000), dtype=np.uint8)
    arr[:400, :500] = 220
    result = decode(encode(Image.fromarray(arr), "JPEG"), size=64, channels=1)
    assert (result.original_height, result.original_width) == (800, 1000)
    assert result.pixels[:30, :30].mean() > 200 and result.pixels[34:, 34:].mean() < 40


def test_colour_jpeg_staged_gray_decodes_its_luma_in_libjpeg(monkeypatch) -> None:
    # issue 17: libjpeg's luma, at draft scale, instead of RGB then Pillow's RGB -> L
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    rgb[:48] = [200, 60, 20]  # a coloured band: gray by luma, not by any one channel
    data = encode(Image.fromarray(rgb), "JPEG", quality=95)
    drafted: list[str] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Image.Image, mode: str | None, size: tuple[int, int] | None) -> Any:
        drafted.append(str(mode))
        return draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    result = decode(data, size=48, channels=1)
    assert drafted == ["L"]
    assert result.metadata == {"mode": "RGB"}  # the source's mode, as before
    with Image.open(io.BytesIO(data)) as img:  # decoder 2: colour at draft scale, then luma
        draft(img, "RGB", (48, 48))
        assert img.size == (64, 48)  # drafted at 1/2, as decoder 3 does
        reference = np.asarray(img.convert("L").resize((48, 48), Image.Resampling.BILINEAR))
    diff = np.abs(result.pixels[:, :, 0].astype(int) - reference.astype(int))
    assert diff.max() <= 3 and diff.mean() < 1.0
    assert abs(int(result.pixels[:20, :, 0].mean()) - int(reference[:20].mean())) <= 1
    monkeypatch.undo()
    colour = decode(data, size=48, channels=3)  # RGB stays RGB
    assert colour.pixels.shape == (48, 48, 3)
    assert colour.pixels[:20, :, 0].mean() > colour.pixels[:20, :, 2].mean() + 100


def test_animated_gif_and_multipage_tiff_are_multi_frame() -> None:
    frames = [Image.new("L", (8, 8), v) for v in (0, 128, 255)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert error_of(gif).kind == "multi_frame"
    tiff = encode(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    assert error_of(tiff).kind == "multi_frame"


# -- failures --------------------------------------------------------------------------------


def test_zero_bytes_is_empty() -> None:
    assert error_of(b"").kind == "empty"


def test_text_named_png_is_not_an_image_and_name_stays_out_of_messages() -> None:
    err = error_of(b"Patient: John Doe, MRN 12345\n", name="John_Doe_chest.png")
    assert err.kind == "not_an_image"
    assert "John" not in err.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_files(fmt: str, keep: float) -> None:
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(rng.integers(0, 255, size=(120, 120, 3), dtype=np.uint8))
    data = encode(noisy, fmt)
    assert error_of(data[: int(len(data) * keep)]).kind == "truncated"


def test_png_cut_inside_the_header_is_truncated() -> None:
    data = encode(quadrant_image(), "PNG")
    assert error_of(data[:20]).kind == "truncated"


def test_corrupt_png_crc_is_invalid() -> None:
    data = bytearray(encode(quadrant_image(), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC
    assert error_of(bytes(data)).kind == "invalid"


@pytest.mark.parametrize("max_pixels", [50_000_000, 10**12])
def test_png_claiming_40000_squared_is_rejected_fast(max_pixels: int) -> None:
    data = crafted_png(40000, 40000)
    start = time.perf_counter()
    err = error_of(data, max_pixels=max_pixels)
    assert err.kind == "too_large"
    assert time.perf_counter() - start < 1.0


def test_png_over_max_pixels_but_under_pillow_limit() -> None:
    err = error_of(crafted_png(10000, 10000))  # 1e8 pixels: Pillow only warns
    assert err.kind == "too_large"
    assert error_of(crafted_png(300, 300), max_pixels=1000).kind == "too_large"


def test_bad_arguments_are_config_errors() -> None:
    data = encode(quadrant_image(), "PNG")
    with pytest.raises(ConfigError):
        decode_image(data, size=0, channels=3)
    with pytest.raises(ConfigError):
        decode_image(data, size=32, channels=2)
    with pytest.raises(ConfigError):
        decode_image(data, size=32, channels=3, max_pixels=0)


# -- arrays ----------------------------------------------------------------------------------


def test_array_to_pixels_dtypes_and_shapes() -> None:
    ramp16 = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (40, 1))
    out = array_to_pixels(ramp16, size=40, channels=1)
    assert out.shape == (40, 40, 1) and out.dtype == np.uint8
    assert out[:, 0].max() == 0 and out[:, -1].min() == 255
    floats = np.linspace(-1.0, 1.0, 100, dtype=np.float64).reshape(10, 10)
    assert array_to_pixels(floats, size=10, channels=3).shape == (10, 10, 3)
    u8 = np.full((5, 7, 1), 77, dtype=np.uint8)
    assert np.all(array_to_pixels(u8, size=4, channels=3) == 77)
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 5:, 3] = 255  # opaque right half, transparent left half
    out = array_to_pixels(rgba, size=10, channels=3)
    assert out[:, :5].max() == 0 and out[:, 5:, 0].min() == 200


@pytest.mark.parametrize(
    ("arr", "kind"),
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), "invalid"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), "invalid"),
        (np.zeros((0, 5)), "empty"),
        (np.zeros(10), "invalid"),
        (np.zeros((2, 3, 4, 5)), "invalid"),
        (np.zeros((4, 4, 7)), "invalid"),
        (np.array([["a", "b"], ["c", "d"]]), "invalid"),
        (np.zeros((3, 3), dtype=complex), "invalid"),
    ],
)
def test_array_to_pixels_rejects(arr: np.ndarray, kind: str) -> None:
    with pytest.raises(ImageError) as info:
        array_to_pixels(arr, size=8, channels=3)
    assert info.value.kind == kind


def test_pixels_from_bytes_round_trip_and_mismatch() -> None:
    arr = np.arange(6 * 5 * 3, dtype=np.uint8).reshape(6, 5, 3)
    assert np.array_equal(pixels_from_bytes(arr.tobytes(), 6, 5, 3), arr)
    with pytest.raises(ImageError):
        pixels_from_bytes(arr.tobytes()[:-1], 6, 5, 3)
    with pytest.raises(ImageError):
        pixels_from_bytes(arr.tobytes(), 5, 6, 4)
    with pytest.raises(ImageError):
        pixels_from_bytes(arr.tobytes(), -6, -5, 3)


# -- DICOM -----------------------------------------------------------------------------------

SAFE_KEYS = {
    "modality",
    "body_part_examined",
    "view_position",
    "rows",
    "columns",
    "bits_stored",
    "photometric_interpretation",
    "pixel_spacing",
    "burned_in_annotation",
    "transfer_syntax",
}


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_real_dicom(name: str) -> None:
    data = dicom_file(name)
    ds = pydicom.dcmread(io.BytesIO(data))
    result = decode(data, size=48, channels=1)
    assert result.format == "dicom"
    assert (result.original_height, result.original_width) == (ds.Rows, ds.Columns)
    assert result.patient_ref == ds.PatientID
    assert set(result.metadata) <= SAFE_KEYS
    assert result.metadata["modality"] == ds.Modality
    assert result.metadata["rows"] == ds.Rows
    text = repr(result.metadata)
    assert str(ds.PatientName) not in text and ds.PatientID not in text
    assert result.pixels.max() > result.pixels.min()  # not flat


def test_dicom_window_and_rescale() -> None:
    pixels = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (100, 1))  # 0..990 by column
    # stored value v means 2v - 1000 after the modality LUT; window [-50, 50] (LINEAR)
    data = make_dicom(
        pixels, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=100
    )
    out = decode(data, size=100, channels=1).pixels[:, :, 0]
    # column c holds v = 10c -> 20c - 1000; below -50 (c < 47) black, above +50 (c > 52) white
    assert out[:, :47].max() == 0
    assert out[:, 53:].min() == 255
    assert 0 < out[0, 50] < 255


def test_dicom_voi_lut_sequence_is_scaled_by_what_the_lut_outputs() -> None:
    pixels = np.tile(np.arange(256, dtype=np.uint16), (4, 1))
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 16])  # LUT Descriptor: claims 16 bits ...
    item.add_new(0x00283006, "US", [4095 - 16 * v for v in range(256)])  # ... uses 12, inverted
    data = make_dicom(pixels, VOILUTSequence=Sequence([item]))
    out = decode(data, size=256, channels=1).pixels[0, :, 0].astype(int)
    assert out[0] == 255 and out[-1] == 0
    assert np.all(np.diff(out) <= 0)


def test_dicom_without_window_is_min_max() -> None:
    pixels = np.full((10, 10), 100, dtype=np.uint16)
    pixels[:, 5:] = 300
    out = decode(make_dicom(pixels), size=10, channels=1).pixels[:, :, 0]
    assert out[:, :5].max() == 0 and out[:, 5:].min() == 255


def test_monochrome1_is_inverted_after_windowing() -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_file("MR_small.dcm")))
    normal = decode(dicom_file("MR_small.dcm"), size=64, channels=1).pixels
    ds.PhotometricInterpretation = "MONOCHROME1"
    buf = io.BytesIO()
    ds.save_as(buf)
    inverted = decode(buf.getvalue(), size=64, channels=1).pixels
    assert np.array_equal(inverted, 255 - normal)


def test_dicom_without_preamble_decodes() -> None:
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    result = decode(make_dicom(pixels, preamble=False), size=8, channels=1)
    assert result.patient_ref == "SYNTH-1"


def test_dicom_colour_photometrics() -> None:
    rgb = decode(dicom_file("SC_rgb_dcmtk_+eb+cr.dcm"), size=50).pixels.astype(int)
    ybr = decode(dicom_file("SC_rgb_jpeg_dcmtk.dcm"), size=50).pixels.astype(int)
    assert np.abs(rgb - ybr).mean() < 8  # same picture; YBR converted to RGB
    palette = decode(dicom_file("examples_palette.dcm"), size=50).pixels
    assert palette.std(axis=2).max() > 0  # really coloured


@pytest.mark.parametrize("name", ["rtdose.dcm", "SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm"])
def test_multi_frame_dicom(name: str) -> None:
    err = error_of(dicom_file(name))
    assert err.kind == "multi_frame"
    assert "frames" in err.message and "multi-frame" in err.message


def test_dicom_without_pixel_data() -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_file("CT_small.dcm")))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    assert error_of(buf.getvalue()).kind == "no_pixel_data"
    assert error_of(dicom_file("rtplan.dcm")).kind == "no_pixel_data"


def test_dicom_transfer_syntax_without_decoder_is_unsupported() -> None:
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    err = error_of(dicom_file("MR_small_jpeg_ls_lossless.dcm"))
    assert err.kind == "unsupported"
    assert "JPEG-LS Lossless" in err.message


def test_dicom_12_bit_jpeg_that_pillow_cannot_decode_is_unsupported() -> None:
    if get_decoder(pydicom.uid.JPEGExtended12Bit).available_plugins != ("pillow",):
        pytest.skip("a 12-bit JPEG decoder other than Pillow is installed")
    assert error_of(dicom_file("JPGExtended.dcm")).kind == "unsupported"


def test_dicom_jpeg2000_decodes_with_pillow() -> None:
    if not get_decoder(pydicom.uid.JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 decoder installed")
    lossless = decode(dicom_file("MR_small_jp2klossless.dcm"), size=64, channels=1).pixels
    native = decode(dicom_file("MR_small.dcm"), size=64, channels=1).pixels
    assert np.array_equal(lossless, native)


def test_dicom_truncated_and_too_large() -> None:
    assert error_of(dicom_file("MR_truncated.dcm")).kind == "truncated"
    assert error_of(dicom_file("CT_small.dcm"), max_pixels=100).kind == "too_large"


def test_deflated_dicom_decodes_and_a_deflate_bomb_is_too_large() -> None:
    data = dicom_file("image_dfl.dcm")
    assert decode(data, size=32).original_width == 512
    (meta_len,) = struct.unpack_from("<I", data, 132 + 8)
    start = 132 + 12 + meta_len
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(b"\x00" * (40 * 1024 * 1024)) + packer.flush()
    assert error_of(data[:start] + bomb, max_pixels=1000).kind == "too_large"


def test_dicom_with_huge_declared_size_is_rejected_before_decoding() -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_file("CT_small.dcm")))
    ds.Rows = ds.Columns = 65535
    buf = io.BytesIO()
    ds.save_as(buf)
    start = time.perf_counter()
    assert error_of(buf.getvalue()).kind == "too_large"
    assert time.perf_counter() - start < 1.0
