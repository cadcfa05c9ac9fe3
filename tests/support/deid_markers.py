"""A DICOM generated from PS3.15 Table E.1-1 as medray ships it (``workers.deid_table``): a
distinct marker in every attribute the table lists, at the top level or nested two sequences
deep (in a frame-content item of a per-frame functional group, sequences the table does not
list), beside 16 x 16 pixels so the file stages. Tests plant it and look for the markers.

Text-like values are unique strings (``MK00012X``, dates from 1921, times with a unique
fraction, UIDs under 1.2.826.0.1.3680043.10.999); numbers and ages cannot be unique text, so
tests compare those element by element (``leaked_elements``).
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian

from medray.workers.deid_table import ACTIONS

UID_ROOT = "1.2.826.0.1.3680043.10.999"
SKIPPED_GROUPS = (0x0000, 0x0002)        # command and file-meta groups: not in a data set body
SKIPPED_TAGS = (0xFFFCFFFC,)             # trailing padding: pydicom writes it nowhere useful
OUTER, INNER = "PerFrameFunctionalGroupsSequence", "FrameContentSequence"


@dataclass(frozen=True)
class Marked:
    """The planted file and what was planted."""

    data: bytes
    values: dict[int, object]   # tag -> the marker value set at that tag
    text: dict[int, str]        # tag -> a marker findable as text (a subset of ``values``)
    nested: bool


def _vr(tag: int) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "LO"  # a row the dictionary does not know: planted as text


def _value(tag: int, vr: str, n: int) -> tuple[object, str | None]:
    """(value, its text form when unique and findable)."""
    text = f"MK{n:05d}X"
    day = (dt.date(1921, 1, 1) + dt.timedelta(days=n)).strftime("%Y%m%d")
    if vr in ("LO", "SH", "ST", "LT", "UT", "UC", "PN", "AE", "CS", "UR"):
        return text, text
    if vr == "DA":
        return day, day
    if vr == "DT":
        value = f"{day}120000.{n:06d}"
        return value, value
    if vr == "TM":
        value = f"1200{n % 60:02d}.{n:06d}"
        return value, value
    if vr == "UI":
        value = f"{UID_ROOT}.{n}"
        return value, value
    if vr == "DS":
        return f"9{n:05d}.5", f"9{n:05d}.5"
    if vr == "IS":
        return f"9{n:06d}", f"9{n:06d}"
    if vr == "AS":
        return f"{n % 100:03d}Y", None
    if vr in ("US", "SS", "UL", "SL"):
        return 40000 + n, None
    if vr in ("FL", "FD"):
        return float(40000 + n), None
    if vr in ("OB", "OW", "UN"):
        return f"MKBIN{n:05d}X".encode(), f"MKBIN{n:05d}X"
    if vr == "SQ":
        return None, None  # filled below
    raise ValueError(f"no marker for VR {vr} of {tag:08X}")


def _item(n: int) -> Dataset:
    """What a listed sequence holds: a UID and a text element, both markers."""
    item = Dataset()
    item.ReferencedSOPInstanceUID = f"{UID_ROOT}.{n}"
    item.LUTExplanation = f"MK{n:05d}X"
    return item


def _plant(ds: Dataset, start: int) -> tuple[dict[int, object], dict[int, str]]:
    values: dict[int, object] = {}
    text: dict[int, str] = {}
    for n, tag in enumerate(sorted(ACTIONS), start=start):
        if tag >> 16 in SKIPPED_GROUPS or tag in SKIPPED_TAGS:
            continue
        vr = _vr(tag)
        if vr == "SQ":
            ds.add_new(Tag(tag), "SQ", Sequence([_item(n)]))
            values[tag] = f"{UID_ROOT}.{n}"
            text[tag] = f"{UID_ROOT}.{n}"
            continue
        value, findable = _value(tag, vr, n)
        ds.add_new(Tag(tag), vr, value)
        values[tag] = value
        if findable is not None:
            text[tag] = findable
    return values, text


def _image(ds: Dataset) -> None:
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.Modality = "CR"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(256, dtype="<u2").reshape(16, 16) * 3).tobytes()


def marker_dicom(nested: bool = False) -> Marked:
    """The planted file (``nested``: the markers two sequences deep, not at the top)."""
    ds = Dataset()
    start = 20_000 if nested else 1
    if nested:
        inner = Dataset()
        values, text = _plant(inner, start)
        outer = Dataset()
        outer.add_new(Tag(INNER), "SQ", Sequence([inner]))
        ds.add_new(Tag(OUTER), "SQ", Sequence([outer]))
        ds.SOPInstanceUID = f"{UID_ROOT}.{start - 1}"
        ds.PatientID = "MKNESTEDPID"
    else:
        values, text = _plant(ds, start)
    _image(ds)
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return Marked(buf.getvalue(), values, text, nested)


def elements_at(ds: Dataset, nested: bool) -> Dataset | None:
    """Where the markers were planted, in a (de-identified) data set; None when gone."""
    if not nested:
        return ds
    outer = ds.get(OUTER)
    if not outer:
        return None
    inner = outer[0].get(INNER)
    return inner[0] if inner else None


def leaked_elements(ds: Dataset, marked: Marked, keep: frozenset[int] = frozenset()
                    ) -> list[str]:
    """Tags (as text) whose planted marker is still there, element by element; ``keep``: tags
    an option retains on purpose."""
    where = elements_at(ds, marked.nested)
    if where is None:
        return []
    leaks = []
    for tag, value in marked.values.items():
        if tag in keep or tag not in where:
            continue
        elem = where[tag]
        if elem.VR == "SQ":
            items = [str(i.get("ReferencedSOPInstanceUID", "")) for i in elem.value]
            texts = [str(i.get("LUTExplanation", "")) for i in elem.value]
            if str(value) in items or any(t.startswith("MK") for t in texts):
                leaks.append(f"{tag:08X}")
            continue
        got = elem.value
        if got == value or (isinstance(got, str | bytes) and str(value) and got and
                            (str(value) in str(got))):
            leaks.append(f"{tag:08X} {elem.keyword}")
    return leaks
