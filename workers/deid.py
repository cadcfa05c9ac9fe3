"""De-identification of DICOM data sets: DICOM PS3.15 Annex E, the Basic Application Level
Confidentiality Profile, from the whole Table E.1-1 of the edition ``deid_table`` was generated
from (every row, applied at every nesting depth), with three of the profile's options, and
stricter than the profile where that is cheap. The promise, option by option, with the test
of each sentence: docs/deid.md and SECURITY.md.

An element's action, first rule that applies:

1. private elements (odd groups), curve (50xx) and overlay (60xx) groups: removed;
2. a row of Table E.1-1: its action, the most protective one its code allows (``X`` remove,
   ``Z`` empty, ``D`` dummy, ``U`` keyed UID remapping; a combined code with X removes,
   ``Z/D`` empties, ``D`` on a sequence removes it, ``X/Z/U*`` keeps the sequence and cleans its
   items); PatientID becomes the keyed patient pseudonym. The options change some rows:
   ``retain_patient_characteristics`` keeps sex, age, size and weight; ``retain_longitudinal``
   shifts dates by a keyed per-patient number of days (times and intervals kept);
   ``clean_descriptors`` keeps six descriptions with names, IDs, dates and numbers cut out;
3. not in the table, stricter: any other element of the patient group (0010,xxxx); public
   elements of VR UN; text, person-name and date/time elements (AE AS DA DT LO LT PN SH ST TM
   UC UR UT) not on ``KEEP_TEXT``; binary elements (OB OD OF OL OV OW) that are not pixel or
   LUT data: removed. UIDs (UI) are remapped unless they name a class, a transfer syntax or
   a registered DICOM UID. Sequences are cleaned item by item. The rest (codes, numbers,
   pixel geometry) is kept.

PatientIdentityRemoved, DeidentificationMethod (0012,0063) and the method code sequence
(0012,0064) say what was done, options included. Burned-in text in pixels is not removed:
``burned_in_reason`` says when a caller should refuse an image. Pure code: data sets in and out
(bytes in and out: ``dicom_io``).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import logging
import re
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from pydicom._uid_dict import UID_dictionary  # where it lives: pydicom.uid does not export it
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from medray.workers.deid_table import ACTIONS, EDITION, MASKED, SOURCE
from medray.workers.errors import ConfigError

logger = logging.getLogger(__name__)

# In the shard-reuse key: a change here re-stages every image (docs/deid.md)
PROFILE_VERSION = f"medray-deid-2/ps3.15-{EDITION}"
PROFILE = ("DICOM PS3.15 Table E.1-1 Basic Application Level Confidentiality Profile, "
           f"edition {EDITION}")
MIN_SALT_BYTES = 32
MIN_SALT_SYMBOLS = 16  # distinct byte values: 32 random bytes have about 30
PATIENT_KEY_HEX_CHARS = 32
MAX_SHIFT_DAYS = 3650

TEXT_VRS = frozenset({"AE", "AS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
DATE_VRS = frozenset({"DA", "DT", "TM"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
# Text elements kept although the profile does not list them: codes and units that say what
# pixels mean, never who or when (see docs/deid.md).
KEEP_TEXT = frozenset({"CodeValue", "CodingSchemeDesignator", "CodingSchemeVersion",
                       "CodeMeaning", "LongCodeValue", "URNCodeValue", "ModalityLUTType",
                       "RescaleType"})
KEEP_BINARY = frozenset({"PixelData", "FloatPixelData", "DoubleFloatPixelData", "LUTData"})
PATIENT_CHARACTERISTICS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight"})
MANUFACTURER = frozenset({"Manufacturer", "ManufacturerModelName"})
DESCRIPTORS = frozenset({"StudyDescription", "SeriesDescription", "ProtocolName",
                         "PerformedProcedureStepDescription", "RequestedProcedureDescription",
                         "AcquisitionDeviceProcessingDescription"})
NEVER_SHIFTED = frozenset({"PatientBirthDate", "PatientBirthTime", "PatientBirthDateTime"})
# text of the data set that a cleaned descriptor must not repeat
_IDENTIFYING = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                "PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID",
                "ReferringPhysicianName", "InstitutionName")
_KEPT_UID_KEYWORDS = frozenset({"CodingSchemeUID", "MappingResourceUID", "ContextUID"})
_DUMMY_BY_VR: dict[str, str] = {"PN": "ANONYMOUS", "DA": "19000101", "TM": "000000",
                                "DT": "19000101000000", "LO": "ANONYMIZED", "SH": "ANONYMIZED",
                                "CS": "ANONYMIZED", "ST": "ANONYMIZED", "LT": "ANONYMIZED",
                                "UT": "ANONYMIZED"}
# PS3.16 CID 7050 De-identification Method
CODES = {"basic": ("113100", "Basic Application Confidentiality Profile"),
         "clean_descriptors": ("113105", "Clean Descriptors Option"),
         "retain_longitudinal": ("113107", "Retain Longitudinal Temporal Information Modified "
                                           "Dates Option"),
         "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option")}
# what a caller is refused by default: SOP classes and modalities known to carry burned-in text
BURNED_IN_CLASSES = ("1.2.840.10008.5.1.4.1.1.7",     # secondary capture, all its variants
                     "1.2.840.10008.5.1.4.1.1.6.",    # ultrasound (measurements, names)
                     "1.2.840.10008.5.1.4.1.1.3.1",   # ultrasound multi-frame
                     "1.2.840.10008.5.1.4.1.1.77.1.1",  # video endoscopic / photographic
                     "1.2.840.10008.5.1.4.1.1.77.1.4")
BURNED_IN_MODALITIES = frozenset({"SC", "US", "XC", "ES", "DOC"})
_PATIENT_GROUP = 0x0010
_PATIENT_ID = Tag("PatientID")


@dataclass(frozen=True)
class Options:
    """The profile options a staging asked for (all off: the Basic Profile alone)."""

    retain_patient_characteristics: bool = False
    retain_longitudinal: bool = False   # PS3.15 "Modified Dates": a keyed per-patient shift
    clean_descriptors: bool = False
    retain_manufacturer: bool = False   # medray's own: Manufacturer, ManufacturerModelName

    @classmethod
    def from_flags(cls, retain: Seq[str] = (), clean: Seq[str] = ()) -> Options:
        return cls(retain_patient_characteristics="patient-characteristics" in retain,
                   retain_longitudinal="longitudinal" in retain,
                   clean_descriptors="descriptors" in clean,
                   retain_manufacturer="manufacturer" in retain)

    def codes(self) -> list[tuple[str, str]]:
        """The CID 7050 codes of what is done: the profile and each option in effect."""
        names = ["basic", *(n for n in ("clean_descriptors", "retain_longitudinal",
                                        "retain_patient_characteristics") if getattr(self, n))]
        return [CODES[n] for n in names]

    def describe(self) -> dict[str, object]:
        """What the manifest records of the de-identification."""
        return {"profile": PROFILE, "edition": EDITION, "table_source": SOURCE,
                "profile_version": PROFILE_VERSION,
                "options": {"retain_patient_characteristics": self.retain_patient_characteristics,
                            "retain_longitudinal_modified_dates": self.retain_longitudinal,
                            "clean_descriptors": self.clean_descriptors,
                            "retain_manufacturer": self.retain_manufacturer},
                "method_codes": [c for c, _ in self.codes()]}


def burned_in_reason(ds: Dataset) -> str | None:
    """Why the pixels of ``ds`` may hold burned-in text (refuse them), or None."""
    if str(ds.get("BurnedInAnnotation") or "").strip().upper() == "YES":
        return "its BurnedInAnnotation is YES"
    sop = str(ds.get("SOPClassUID") or "")
    if sop and any(sop == c or (c.endswith(".") and sop.startswith(c)) or
                   sop.startswith(c + ".") for c in BURNED_IN_CLASSES):
        return f"its SOP class {sop} (secondary capture, ultrasound, photo) often carries text"
    modality = str(ds.get("Modality") or "").strip().upper()
    if modality in BURNED_IN_MODALITIES:
        return f"its modality {modality} often carries burned-in text"
    return None


def check_salt(salt: bytes) -> None:
    """ConfigError unless ``salt`` is long and varied enough that nothing derived from it (a
    public salt_id, a pseudonym) lets anyone guess it offline."""
    if not isinstance(salt, bytes | bytearray):
        raise ConfigError("the de-identification salt must be bytes (e.g. os.urandom(32))")
    material = bytes(salt)
    text = material.strip()
    if re.fullmatch(rb"[0-9a-fA-F]+", text) and len(text) % 2 == 0:
        material = bytes.fromhex(text.decode())  # medray writes its salt as hex
    if len(material) < MIN_SALT_BYTES or len(set(material)) < MIN_SALT_SYMBOLS:
        raise ConfigError(
            f"the de-identification salt is too weak ({len(material)} bytes, "
            f"{len(set(material))} distinct): use {MIN_SALT_BYTES} random bytes "
            "(medray generates them; `openssl rand -hex 32`) and keep them secret")


@dataclass
class _Context:
    """What cleaning one data set needs besides its elements."""

    shift_days: int = 0
    tokens: set[str] = field(default_factory=set)  # what a cleaned descriptor must not say


class Deidentifier:
    """Applies the profile with the salt's keyed pseudonyms: the same salt always gives the
    same patient keys, UIDs, date shifts and path pseudonyms, so images of one patient or
    study stay linked across runs; without the salt they cannot be reversed or recomputed."""

    def __init__(self, salt: bytes, options: Options | None = None) -> None:
        check_salt(salt)
        self._salt = bytes(salt)
        self.options = options or Options()

    def __repr__(self) -> str:  # never show the salt in logs
        return f"Deidentifier(salt=<hidden>, options={self.options})"

    def _mac(self, message: bytes) -> bytes:
        return hmac.new(self._salt, message, hashlib.sha256).digest()

    def patient_key(self, raw_id: str) -> str:
        """HMAC-SHA256(salt, raw_id) as 32 hex characters: a stable, irreversible pseudonym."""
        return self._mac(raw_id.encode("utf-8")).hex()[:PATIENT_KEY_HEX_CHARS]

    def pseudonym(self, uri: str) -> str:
        """A source path's keyed pseudonym, ``dicom:<32 hex>``: what lake rows carry."""
        return "dicom:" + self._mac(b"path\x00" + uri.encode("utf-8")).hex()[:32]

    def remap_uid(self, uid: str) -> str:
        """A new UID ``2.25.<128-bit integer>`` derived from ``uid``; same input, same output
        (PS3.5 B.2's UUID root; at most 44 characters)."""
        digest = self._mac(b"uid\x00" + uid.strip().encode("ascii", "replace"))
        return f"2.25.{int.from_bytes(digest[:16], 'big') or 1}"

    def shift_days(self, raw_patient: str) -> int:
        """Days a patient's dates move back (1..MAX_SHIFT_DAYS), keyed: the same patient, the
        same shift, so intervals between their studies survive."""
        digest = self._mac(b"shift\x00" + raw_patient.encode("utf-8"))
        return 1 + int.from_bytes(digest[:4], "big") % MAX_SHIFT_DAYS

    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified deep copy of ``ds``; ``ds`` itself is left untouched."""
        out = copy.deepcopy(ds)
        ctx = _Context(shift_days=self.shift_days(str(ds.get("PatientID") or "")),
                       tokens=_identifying_tokens(ds))
        self._clean(out, ctx)
        meta = getattr(out, "file_meta", None)
        if meta is not None:
            self._clean_file_meta(meta)
        if getattr(out, "preamble", None) is not None:
            out.preamble = b"\x00" * 128
        self._mark(out)
        return out

    # -- the decision, element by element --------------------------------------------------
    def action(self, tag: BaseTag, elem: DataElement) -> str:
        """X, Z, D, U, K (keep), recurse, shift, clean or pseudonym."""
        group, keyword = tag.group, keyword_for_tag(tag) or ""
        if tag.is_private or 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            return "X"
        opts, vr = self.options, elem.VR
        code = _table_code(int(tag))
        if opts.retain_patient_characteristics and keyword in PATIENT_CHARACTERISTICS:
            return "K"
        if opts.retain_longitudinal and vr in DATE_VRS and keyword not in NEVER_SHIFTED:
            return "shift" if vr != "TM" else "K"  # whole days: a time of day is unchanged
        if opts.clean_descriptors and keyword in DESCRIPTORS:
            return "clean"
        if opts.retain_manufacturer and keyword in MANUFACTURER:
            return "K"
        if code is not None:
            if tag == _PATIENT_ID:
                return "pseudonym"
            return _resolve(code, vr)
        if group == _PATIENT_GROUP or vr == "UN":
            return "X"
        if vr == "SQ":
            return "recurse"
        if vr == "UI":
            return "U" if _uid_is_instance(keyword, elem) else "K"
        if vr in TEXT_VRS or vr in DATE_VRS:
            return "K" if keyword in KEEP_TEXT else "X"
        if vr in BINARY_VRS:
            return "K" if keyword in KEEP_BINARY or keyword.endswith("LookupTableData") else "X"
        return "K"

    def _clean(self, ds: Dataset, ctx: _Context) -> None:
        for raw_tag in list(ds.keys()):
            tag = Tag(raw_tag)
            try:
                elem = ds[tag]
            except Exception:  # noqa: BLE001 - a value pydicom cannot read cannot be vetted
                logger.debug("removing unreadable element %s", tag)
                del ds[tag]
                continue
            self._apply(ds, tag, elem, self.action(tag, elem), ctx)

    def _apply(self, ds: Dataset, tag: BaseTag, elem: DataElement, action: str,
               ctx: _Context) -> None:
        if action == "X":
            del ds[tag]
        elif action == "pseudonym":
            raw = "" if elem.value is None else str(elem.value)
            elem.value = self.patient_key(raw) if raw else ""
        elif action == "Z":
            elem.value = elem.empty_value
        elif action == "D":
            elem.value = _DUMMY_BY_VR.get(elem.VR, elem.empty_value)
        elif action == "U":
            elem.value = self._remap_value(elem)
        elif action == "shift":
            shifted = _shift(elem, ctx.shift_days)
            if shifted is None:
                del ds[tag]
            else:
                elem.value = shifted
        elif action == "clean":
            elem.value = _clean_text(str(elem.value or ""), ctx.tokens)
        elif action == "recurse" and elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                self._clean(item, ctx)
        # "K": keep

    def _remap_value(self, elem: DataElement) -> object:
        if elem.VR != "UI":  # a UID attribute stored with another VR: do not guess, empty it
            return elem.empty_value
        if elem.value is None or elem.value == "":
            return elem.value
        if elem.VM > 1:
            return [self.remap_uid(str(v)) for v in elem.value]
        return self.remap_uid(str(elem.value))

    def _clean_file_meta(self, meta: FileMetaDataset) -> None:
        for raw_tag in list(meta.keys()):
            tag = Tag(raw_tag)
            elem = meta[tag]
            keyword = elem.keyword
            if keyword in ("FileMetaInformationGroupLength", "FileMetaInformationVersion",
                           "MediaStorageSOPClassUID", "TransferSyntaxUID",
                           "ImplementationClassUID", "ImplementationVersionName"):
                continue
            if keyword == "MediaStorageSOPInstanceUID":
                elem.value = self._remap_value(elem)
            else:  # AE titles, private information: they name sites and machines
                del meta[tag]

    def _mark(self, out: Dataset) -> None:
        opts = self.options
        out.PatientIdentityRemoved = "YES"
        method = [f"PS3.15 E.1-1 Basic Profile, edition {EDITION}", PROFILE_VERSION,
                  "PatientID: HMAC pseudonym; UIDs remapped (HMAC, 2.25 root)",
                  "Also removed: private, curve, overlay and UN elements",
                  "Also removed: unlisted text, name, date and binary elements"]
        method += [meaning for code, meaning in opts.codes() if code != "113100"]
        out.DeidentificationMethod = [m[:64] for m in method]  # LO: 64 characters a value
        items = []
        for code, meaning in opts.codes():
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", meaning
            items.append(item)
        out.DeidentificationMethodCodeSequence = Sequence(items)
        out.LongitudinalTemporalInformationModified = ("MODIFIED" if opts.retain_longitudinal
                                                       else "REMOVED")


# -- helpers --------------------------------------------------------------------------------
def _table_code(tag: int) -> str | None:
    code = ACTIONS.get(tag)
    if code is not None:
        return code
    for value, mask, masked_code in MASKED:
        if tag & mask == value:
            return masked_code
    return None


def _resolve(code: str, vr: str) -> str:
    """The one action ("X", "Z", "D", "U" or "recurse") taken for a Table E.1-1 code: the
    most protective one the code allows."""
    if "U*" in code:
        return "recurse"
    if code == "U":
        return "U"
    if "X" in code:
        return "X"
    if code.startswith("Z"):
        return "Z"
    if code == "D":
        return "X" if vr == "SQ" else "D"
    raise ValueError(f"unknown PS3.15 action code {code!r}")


def _uid_is_instance(keyword: str, elem: DataElement) -> bool:
    if keyword.endswith("ClassUID") or "TransferSyntax" in keyword:
        return False
    if keyword in _KEPT_UID_KEYWORDS:
        return False
    values = elem.value if elem.VM > 1 else [elem.value]
    registered = all(str(v).startswith("1.2.840.10008.") or str(v) in UID_dictionary
                     for v in values if v)
    return not registered


def _shift(elem: DataElement, days: int) -> object | None:
    """A DA or DT value moved ``days`` back (a DT keeps its time, loses its UTC offset);
    None when a value is not a date medray can read (then it is removed)."""
    values = elem.value if elem.VM > 1 else [elem.value]
    out: list[str] = []
    for value in values:
        text = str(value or "").strip()
        if not text:
            out.append(text)
            continue
        try:
            day = dt.datetime.strptime(text[:8], "%Y%m%d").date() - dt.timedelta(days=days)
        except ValueError:
            return None
        rest = re.split(r"[+-]", text[8:], maxsplit=1)[0] if elem.VR == "DT" else ""
        out.append(day.strftime("%Y%m%d") + rest)
    return out if elem.VM > 1 else out[0]


def _identifying_tokens(ds: Dataset) -> set[str]:
    tokens: set[str] = set()
    for keyword in _IDENTIFYING:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - unreadable: nothing to learn from it
            logger.debug("cannot read %s for descriptor cleaning", keyword)
            continue
        for part in re.split(r"[^0-9A-Za-z]+", str(value or "")):
            if len(part) >= 2:
                tokens.add(part.casefold())
    return tokens


def _clean_text(text: str, identifying: set[str]) -> str:
    """A descriptor without the data set's names and IDs, and without any token holding a
    digit run of three or more (dates, record numbers): ``--clean descriptors``."""
    kept = [t for t in re.split(r"\s+", text)
            if t and not re.search(r"\d{3,}", t)
            and not any(p.casefold() in identifying for p in re.split(r"[^0-9A-Za-z]+", t)
                        if p)]
    return " ".join(kept)[:64]


__all__ = ["PROFILE_VERSION", "Deidentifier", "Options", "burned_in_reason", "check_salt"]
