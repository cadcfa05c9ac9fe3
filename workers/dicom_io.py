"""DICOM bytes in and out, safely: parsing with bounded memory (``read_dicom``), the
non-identifying attributes a shard row may carry (``safe_metadata``), and a whole file
de-identified (``deidentify_bytes``: ``deid``'s profile applied, a valid file written back).

Pure code: bytes in, bytes and data sets out; errors are ImageError with a kind.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from collections.abc import Callable

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medray.workers.deid import Deidentifier
from medray.workers.errors import ImageError
from medray.workers.pixels import DEFAULT_MAX_PIXELS, max_input_bytes, short_message

logger = logging.getLogger(__name__)


def quiet_pydicom() -> None:
    """Silence pydicom's warnings for this process: they quote the values they read (an invalid
    UID, a date), and a staging worker's output ends up in the job's log and history. Called
    once by each worker that reads DICOM; medray reports a bad file as an errors row instead."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")

# Non-identifying attributes reported as metadata: (DICOM keyword, metadata key).
_SAFE_FIELDS: tuple[tuple[str, str], ...] = (
    ("Modality", "modality"),
    ("BodyPartExamined", "body_part_examined"),
    ("ViewPosition", "view_position"),
    ("Rows", "rows"),
    ("Columns", "columns"),
    ("BitsStored", "bits_stored"),
    ("PhotometricInterpretation", "photometric_interpretation"),
    ("PixelSpacing", "pixel_spacing"),
    ("BurnedInAnnotation", "burned_in_annotation"),
)
_INT_FIELDS = frozenset({"Rows", "Columns", "BitsStored"})
_MAX_TEXT = 64


def safe_metadata(ds: Dataset) -> dict[str, str | int | float]:
    """Non-identifying attributes of ``ds`` (modality, body part, view, size, bits, spacing).

    Multi-valued attributes (PixelSpacing) are joined with DICOM's own separator, a backslash:
    ``"0.3125\\0.3125"``. Missing or unreadable attributes are left out, never guessed.
    """
    meta: dict[str, str | int | float] = {}
    for keyword, key in _SAFE_FIELDS:
        try:
            value = ds.get(keyword)
            if value is None or value == "":
                continue
            if keyword in _INT_FIELDS:
                meta[key] = int(value)
            elif isinstance(value, list | tuple | MultiValue):
                meta[key] = "\\".join(str(v) for v in value)[:_MAX_TEXT]
            else:
                text = str(value).strip()
                if text:
                    meta[key] = text[:_MAX_TEXT]
        except Exception:  # noqa: BLE001 - a broken optional attribute is simply not reported
            logger.debug("skipping unreadable DICOM attribute %s", keyword)
    try:
        ts = getattr(ds, "file_meta", None)
        ts_uid = ts.get("TransferSyntaxUID") if ts is not None else None
        if ts_uid:
            meta["transfer_syntax"] = str(ts_uid)[:_MAX_TEXT]
    except Exception:  # noqa: BLE001
        logger.debug("skipping unreadable transfer syntax")
    return meta


_DEFLATED = "1.2.840.10008.1.2.1.99"
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_INFLATE_CHUNK = 4 * 1024 * 1024


def _file_meta_end(data: bytes) -> tuple[int, str] | None:
    """(offset of the data set after the file-meta group, transfer syntax), if there is one."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    pos, ts = 132, ""
    while pos + 8 <= len(data):
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            if pos + 12 > len(data):
                return None
            (length,) = struct.unpack_from("<I", data, pos + 8)
            head = 12
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            head = 8
        if element == 0x0010:
            ts = data[pos + head : pos + head + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos += head + length
    return pos, ts


def _guard_deflate(data: bytes, max_pixels: int) -> None:
    """pydicom inflates a deflated data set in one go: measure it first, in bounded chunks."""
    meta = _file_meta_end(data)
    if meta is None or meta[1] != _DEFLATED:
        return
    limit = max_input_bytes(max_pixels)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = data[meta[0] :]
    total = 0
    try:
        while pending and not inflater.eof:
            total += len(inflater.decompress(pending, _INFLATE_CHUNK))
            if total > limit:
                raise ImageError(
                    f"the deflated DICOM inflates to more than {limit} bytes", "too_large"
                )
            pending = inflater.unconsumed_tail
    except zlib.error as exc:
        raise ImageError(f"corrupt deflated DICOM: {short_message(exc)}", "invalid") from exc


def read_dicom(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Dataset:
    """Parse DICOM bytes (``force=True``: a missing preamble is fine) without unbounded memory.

    A deflated data set is inflated only up to a bound derived from ``max_pixels``
    (16 MiB + 6 bytes a pixel). Raises ImageError (``empty``, ``too_large``, ``truncated``,
    ``invalid``), nothing else.
    """
    if not data:
        raise ImageError("the DICOM input is empty (0 bytes)", "empty")
    _guard_deflate(data, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        for _ in ds.iterall():  # pydicom converts values lazily: read them all here, once
            pass
        return ds
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        kind = "truncated" if isinstance(exc, EOFError) else "invalid"
        raise ImageError(f"cannot parse DICOM: {short_message(exc)}", kind) from exc


def _ensure_file_meta(ds: Dataset) -> None:
    """Give a dataset read without a file-meta header the minimum needed to write a file."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if not meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        if implicit is None or implicit:
            meta.TransferSyntaxUID = ImplicitVRLittleEndian
        else:
            meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if not meta.get("MediaStorageSOPClassUID") and ds.get("SOPClassUID"):
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if not meta.get("MediaStorageSOPInstanceUID") and ds.get("SOPInstanceUID"):
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _write(ds: Dataset) -> bytes:
    attempts: tuple[Callable[[io.BytesIO], None], ...] = (
        lambda buf: ds.save_as(buf, enforce_file_format=True),
        lambda buf: ds.save_as(buf, enforce_file_format=False),
    )
    last: Exception | None = None
    for attempt in attempts:
        buf = io.BytesIO()
        try:
            attempt(buf)
            return buf.getvalue()
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for odd datasets
            last = exc
    detail = short_message(last) if last is not None else "unknown error"
    raise ImageError(f"cannot write the de-identified DICOM: {detail}", "invalid") from last


def deidentify_bytes(
    data: bytes, deidentifier: Deidentifier, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, dict]:
    """De-identify a DICOM file given as bytes: (de-identified file bytes, safe metadata).

    The result is a DICOM file with a zeroed preamble and a file-meta header, also when the
    input had neither (a data set without SOP Class/Instance UIDs, which cannot have a valid
    header, is written as a bare data set). Raises ImageError for input that is empty or not
    DICOM, or too large to inflate (``max_pixels``, see ``read_dicom``).
    """
    ds = read_dicom(data, max_pixels=max_pixels)
    if len(ds) == 0:
        raise ImageError("no DICOM data elements found", "not_an_image")
    _ensure_file_meta(ds)
    clean = deidentifier.deidentify(ds)  # medray's own code: a bug in it is not disguised
    return _write(clean), safe_metadata(clean)


__all__ = ["DEFAULT_MAX_PIXELS", "deidentify_bytes", "quiet_pydicom", "read_dicom",
           "safe_metadata"]
