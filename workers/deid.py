"""De-identification of DICOM datasets (PS3.15 Annex E, Basic Application Level Confidentiality
Profile, no options).

The profile is data: ``BASIC_PROFILE`` maps attribute keywords to the action codes of PS3.15
Table E.1-1, transcribed as the standard writes them ("X/Z/D" and so on). ``_resolve`` turns a
code into the one action this module performs, always the most protective one the element allows:

- ``X`` remove, ``Z`` empty value, ``D`` dummy value, ``U`` consistent UID remapping (HMAC);
- a combination containing ``X`` removes; ``Z/D`` empties; ``D`` on a sequence removes it;
- ``X/Z/U*`` keeps the sequence and cleans its items (their UIDs are remapped).

Beyond the table, stricter than the profile where it is cheap to be:

- every private element is removed (the profile's default without the Retain Safe Private
  option), and so is every element of the patient group (0010,xxxx) the table does not list;
- curve groups (50xx) and overlay groups (60xx) are removed whole;
- every other element of VR UI is remapped unless it names a class, a transfer syntax or a
  registered DICOM UID (``1.2.840.10008.*``, pydicom's UID dictionary);
- PatientID becomes ``patient_key`` (a keyed hash), so one patient keeps one pseudonym;
- the 128-byte preamble is zeroed and identifying file-meta elements (AE titles, private
  file-meta information) are removed.

Burned-in text in the pixels is not removed; ``safe_metadata`` reports BurnedInAnnotation so a
caller can drop such images. Nothing here does I/O: ``deidentify_bytes`` takes and returns bytes.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import io
import logging
import struct
import zlib
from collections.abc import Callable

import pydicom
from pydicom._uid_dict import UID_dictionary  # where it lives: pydicom.uid does not export it
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medray.workers.errors import ConfigError, ImageError

logger = logging.getLogger(__name__)

MIN_SALT_BYTES = 16
PATIENT_KEY_HEX_CHARS = 32
# (0012,0063) is LO: several values of at most 64 characters each
DEIDENTIFICATION_METHOD = (
    "DICOM PS3.15 E.1-1 Basic Confidentiality Profile (medray)",
    "PatientID replaced by an HMAC-SHA256 pseudonym",
    "UIDs remapped; private, curve and overlay elements removed",
)

# DICOM PS3.15 Annex E, Table E.1-1 "Application Level Confidentiality Profile Attributes",
# column "Basic Prof.". A transcription of the rows that apply to images (keyword -> action code
# as printed in the standard). Rows for retired command-group elements are left out.
BASIC_PROFILE: dict[str, str] = {
    "AccessionNumber": "Z",
    "AcquisitionComments": "X",
    "AcquisitionContextSequence": "X",
    "AcquisitionDate": "X/Z",
    "AcquisitionDateTime": "X/D",
    "AcquisitionDeviceProcessingDescription": "X/D",
    "AcquisitionProtocolDescription": "X",
    "AcquisitionTime": "X/Z",
    "ActualHumanPerformersSequence": "X",
    "AdditionalPatientHistory": "X",
    "AdmissionID": "X",
    "AdmittingDate": "X",
    "AdmittingDiagnosesCodeSequence": "X",
    "AdmittingDiagnosesDescription": "X",
    "AdmittingTime": "X",
    "Allergies": "X",
    "Arbitrary": "X",
    "AuthorObserverSequence": "X",
    "BranchOfService": "X",
    "CassetteID": "X",
    "CommentsOnThePerformedProcedureStep": "X",
    "ConcatenationUID": "U",
    "ConfidentialityConstraintOnPatientDataDescription": "X",
    "ContentCreatorIdentificationCodeSequence": "X",
    "ContentCreatorName": "Z",
    "ContentDate": "Z/D",
    "ContentSequence": "X",
    "ContentTime": "Z/D",
    "ContextGroupExtensionCreatorUID": "U",
    "ContrastBolusAgent": "Z/D",
    "ContributionDescription": "X",
    "CountryOfResidence": "X",
    "CreatorVersionUID": "U",
    "CurrentPatientLocation": "X",
    "CurveDate": "X",
    "CurveTime": "X",
    "CustodialOrganizationSequence": "X",
    "DataSetTrailingPadding": "X",
    "DerivationDescription": "X",
    "DetectorID": "X/D",
    "DeviceSerialNumber": "X/Z/D",
    "DeviceUID": "U",
    "DigitalSignatureUID": "X",
    "DigitalSignaturesSequence": "X",
    "DimensionOrganizationUID": "U",
    "DischargeDiagnosisDescription": "X",
    "DistributionAddress": "X",
    "DistributionName": "X",
    "DoseReferenceUID": "U",
    "EthnicGroup": "X",
    "FailedSOPInstanceUIDList": "U",
    "FiducialUID": "U",
    "FillerOrderNumberImagingServiceRequest": "Z",
    "FrameComments": "X",
    "FrameOfReferenceUID": "U",
    "GantryID": "X",
    "GeneratorID": "X",
    "GraphicAnnotationSequence": "D",
    "HumanPerformerName": "X",
    "HumanPerformerOrganization": "X",
    "IconImageSequence": "X",
    "IdentifyingComments": "X",
    "ImageComments": "X",
    "ImagePresentationComments": "X",
    "ImagingServiceRequestComments": "X",
    "Impressions": "X",
    "InstanceCreationDate": "X/D",
    "InstanceCreationTime": "X/Z/D",
    "InstanceCreatorUID": "U",
    "InstitutionAddress": "X",
    "InstitutionCodeSequence": "X/Z/D",
    "InstitutionName": "X/Z/D",
    "InstitutionalDepartmentName": "X",
    "InsurancePlanIdentification": "X",
    "IntendedRecipientsOfResultsIdentificationSequence": "X",
    "InterpretationApproverSequence": "X",
    "InterpretationAuthor": "X",
    "InterpretationDiagnosisDescription": "X",
    "InterpretationIDIssuer": "X",
    "InterpretationRecorder": "X",
    "InterpretationText": "X",
    "InterpretationTranscriber": "X",
    "IrradiationEventUID": "U",
    "IssuerOfAdmissionID": "X",
    "IssuerOfPatientID": "X",
    "IssuerOfServiceEpisodeID": "X",
    "LargePaletteColorLookupTableUID": "U",
    "LastMenstrualDate": "X",
    "MAC": "X",
    "MediaStorageSOPInstanceUID": "U",
    "MedicalAlerts": "X",
    "MedicalRecordLocator": "X",
    "MilitaryRank": "X",
    "ModifiedAttributesSequence": "X",
    "ModifiedImageDescription": "X",
    "ModifyingDeviceID": "X",
    "ModifyingDeviceManufacturer": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "NamesOfIntendedRecipientsOfResults": "X",
    "Occupation": "X",
    "OperatorIdentificationSequence": "X/D",
    "OperatorsName": "X/Z/D",
    "OrderCallbackPhoneNumber": "X",
    "OrderEnteredBy": "X",
    "OrderEntererLocation": "X",
    "OriginalAttributesSequence": "X",
    "OtherPatientIDs": "X",
    "OtherPatientIDsSequence": "X",
    "OtherPatientNames": "X",
    "OverlayDate": "X",
    "OverlayTime": "X",
    "ParticipantSequence": "X",
    "PatientAddress": "X",
    "PatientAge": "X",
    "PatientBirthDate": "Z",
    "PatientBirthName": "X",
    "PatientBirthTime": "X",
    "PatientComments": "X",
    "PatientID": "Z",  # replaced by Deidentifier.patient_key, a dummy value the profile allows
    "PatientInstitutionResidence": "X",
    "PatientInsurancePlanCodeSequence": "X",
    "PatientMotherBirthName": "X",
    "PatientName": "Z",
    "PatientPrimaryLanguageCodeSequence": "X",
    "PatientPrimaryLanguageModifierCodeSequence": "X",
    "PatientReligiousPreference": "X",
    "PatientSex": "Z",
    "PatientSexNeutered": "X/Z",
    "PatientSize": "X",
    "PatientState": "X",
    "PatientTelephoneNumbers": "X",
    "PatientTransportArrangements": "X",
    "PatientWeight": "X",
    "PerformedLocation": "X",
    "PerformedProcedureStepDescription": "X",
    "PerformedProcedureStepEndDate": "X",
    "PerformedProcedureStepEndTime": "X",
    "PerformedProcedureStepID": "X",
    "PerformedProcedureStepStartDate": "X",
    "PerformedProcedureStepStartTime": "X",
    "PerformedStationAETitle": "X",
    "PerformedStationGeographicLocationCodeSequence": "X",
    "PerformedStationName": "X",
    "PerformedStationNameCodeSequence": "X",
    "PerformingPhysicianIdentificationSequence": "X",
    "PerformingPhysicianName": "X",
    "PersonAddress": "X",
    "PersonIdentificationCodeSequence": "D",
    "PersonName": "D",
    "PersonTelephoneNumbers": "X",
    "PhysicianApprovingInterpretation": "X",
    "PhysiciansOfRecord": "X",
    "PhysiciansOfRecordIdentificationSequence": "X",
    "PhysiciansReadingStudyIdentificationSequence": "X",
    "PlacerOrderNumberImagingServiceRequest": "Z",
    "PreMedication": "X",
    "PregnancyStatus": "X",
    "ProtocolName": "X/D",
    "ReasonForStudy": "X",
    "ReasonForTheImagingServiceRequest": "X",
    "ReferencedDigitalSignatureSequence": "X",
    "ReferencedFrameOfReferenceUID": "U",
    "ReferencedGeneralPurposeScheduledProcedureStepTransactionUID": "U",
    "ReferencedImageSequence": "X/Z/U*",
    "ReferencedPatientAliasSequence": "X",
    "ReferencedPatientPhotoSequence": "X",
    "ReferencedPatientSequence": "X",
    "ReferencedPerformedProcedureStepSequence": "X/Z/D",
    "ReferencedSOPInstanceMACSequence": "X",
    "ReferencedSOPInstanceUID": "U",
    "ReferencedSOPInstanceUIDInFile": "U",
    "ReferencedStudySequence": "X/Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianIdentificationSequence": "X",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianTelephoneNumbers": "X",
    "RegionOfResidence": "X",
    "RelatedFrameOfReferenceUID": "U",
    "RequestAttributesSequence": "X",
    "RequestedContrastAgent": "X",
    "RequestedProcedureComments": "X",
    "RequestedProcedureDescription": "X/Z",
    "RequestedProcedureID": "X",
    "RequestedProcedureLocation": "X",
    "RequestingPhysician": "X",
    "RequestingService": "X",
    "ResponsibleOrganization": "X",
    "ResponsiblePerson": "X",
    "ResultsComments": "X",
    "ResultsDistributionListSequence": "X",
    "ResultsIDIssuer": "X",
    "ReviewerName": "X/Z",
    "ScheduledHumanPerformersSequence": "X",
    "ScheduledPatientInstitutionResidence": "X",
    "ScheduledPerformingPhysicianIdentificationSequence": "X",
    "ScheduledPerformingPhysicianName": "X",
    "ScheduledProcedureStepDescription": "X",
    "ScheduledProcedureStepEndDate": "X",
    "ScheduledProcedureStepEndTime": "X",
    "ScheduledProcedureStepLocation": "X",
    "ScheduledProcedureStepStartDate": "X",
    "ScheduledProcedureStepStartTime": "X",
    "ScheduledStationAETitle": "X",
    "ScheduledStationGeographicLocationCodeSequence": "X",
    "ScheduledStationName": "X",
    "ScheduledStationNameCodeSequence": "X",
    "ScheduledStudyLocation": "X",
    "ScheduledStudyLocationAETitle": "X",
    "SeriesDate": "X/D",
    "SeriesDescription": "X",
    "SeriesInstanceUID": "U",
    "SeriesTime": "X/D",
    "ServiceEpisodeDescription": "X",
    "ServiceEpisodeID": "X",
    "SmokingStatus": "X",
    "SOPInstanceUID": "U",
    "SourceImageSequence": "X/Z/U*",
    "SpecialNeeds": "X",
    "StationName": "X/Z/D",
    "StorageMediaFileSetUID": "U",
    "StudyComments": "X",
    "StudyDate": "Z",
    "StudyDescription": "X",
    "StudyID": "Z",
    "StudyIDIssuer": "X",
    "StudyInstanceUID": "U",
    "StudyTime": "Z",
    "SynchronizationFrameOfReferenceUID": "U",
    "TemplateExtensionCreatorUID": "U",
    "TemplateExtensionOrganizationUID": "U",
    "TextComments": "X",
    "TextString": "X",
    "TimezoneOffsetFromUTC": "X",
    "TopicAuthor": "X",
    "TopicKeywords": "X",
    "TopicSubject": "X",
    "TopicTitle": "X",
    "TransactionUID": "U",
    "UID": "U",
    "VerifyingObserverIdentificationCodeSequence": "Z",
    "VerifyingObserverName": "D",
    "VerifyingObserverSequence": "D",
    "VerifyingOrganization": "X",
    "VisitComments": "X",
}

# Not in the table but identifying in practice (AE titles name a site's machines).
EXTRA_REMOVALS: tuple[str, ...] = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID",
    "PrivateInformation",
    "StationAETitle",
)

# Elements of VR UI that name what something is, not which instance: never remapped.
_KEPT_UID_KEYWORDS = frozenset({"CodingSchemeUID", "MappingResourceUID", "ContextUID"})

_DUMMY_BY_VR: dict[str, str] = {
    "PN": "ANONYMOUS",
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "LO": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "CS": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "UT": "ANONYMIZED",
}

_PATIENT_ID_TAG = Tag("PatientID")
_PATIENT_GROUP = 0x0010


def _resolve(code: str, vr: str) -> str:
    """The one action ("X", "Z", "D", "U" or "recurse") taken for a Table E.1-1 code."""
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


def _tag_table() -> dict[BaseTag, str]:
    table: dict[BaseTag, str] = {}
    for keyword, code in BASIC_PROFILE.items():
        tag = tag_for_keyword(keyword)
        if tag is None:  # a typo in the table must fail loudly, not leak silently
            raise RuntimeError(f"unknown DICOM keyword in BASIC_PROFILE: {keyword}")
        table[Tag(tag)] = code
    for keyword in EXTRA_REMOVALS:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise RuntimeError(f"unknown DICOM keyword in EXTRA_REMOVALS: {keyword}")
        table[Tag(tag)] = "X"
    return table


_TAG_ACTIONS: dict[BaseTag, str] = _tag_table()

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


class Deidentifier:
    """Pseudonymises patients and UIDs with a keyed hash and applies the Basic Profile.

    The same salt always gives the same pseudonyms, so images of one patient or one study stay
    linked across runs; without the salt the pseudonyms cannot be reversed or recomputed.
    """

    def __init__(self, salt: bytes) -> None:
        if not isinstance(salt, bytes | bytearray):
            raise ConfigError("the de-identification salt must be bytes (e.g. os.urandom(32))")
        if len(salt) < MIN_SALT_BYTES:
            raise ConfigError(
                f"the de-identification salt has {len(salt)} bytes; use at least "
                f"{MIN_SALT_BYTES} random bytes (e.g. os.urandom(32)) and keep it secret"
            )
        self._salt = bytes(salt)

    def __repr__(self) -> str:  # never show the salt in logs
        return "Deidentifier(salt=<hidden>)"

    def _mac(self, message: bytes) -> bytes:
        return hmac.new(self._salt, message, hashlib.sha256).digest()

    def patient_key(self, raw_id: str) -> str:
        """HMAC-SHA256(salt, raw_id) as 32 hex characters: a stable, irreversible pseudonym."""
        return self._mac(raw_id.encode("utf-8")).hex()[:PATIENT_KEY_HEX_CHARS]

    def remap_uid(self, uid: str) -> str:
        """A new UID ``2.25.<128-bit integer>`` derived from ``uid``; same input, same output.

        ``2.25`` is the UUID-derived root of PS3.5 B.2; a 128-bit integer has at most 39 digits,
        so the result is at most 44 characters (the limit is 64).
        """
        digest = self._mac(b"uid\x00" + uid.strip().encode("ascii", "replace"))
        number = int.from_bytes(digest[:16], "big") or 1
        return f"2.25.{number}"

    def safe_metadata(self, ds: Dataset) -> dict[str, str | int | float]:
        """Same as the module-level :func:`safe_metadata`."""
        return safe_metadata(ds)

    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified deep copy of ``ds``; ``ds`` itself is left untouched."""
        out = copy.deepcopy(ds)
        self._clean(out)
        meta = getattr(out, "file_meta", None)
        if meta is not None:
            self._clean_file_meta(meta)
        if getattr(out, "preamble", None) is not None:
            out.preamble = b"\x00" * 128
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = list(DEIDENTIFICATION_METHOD)
        code = Dataset()
        code.CodeValue = "113100"
        code.CodingSchemeDesignator = "DCM"
        code.CodeMeaning = "Basic Application Confidentiality Profile"
        out.DeidentificationMethodCodeSequence = Sequence([code])
        out.LongitudinalTemporalInformationModified = "REMOVED"
        return out

    # -- internals -------------------------------------------------------------------------

    def _clean(self, ds: Dataset) -> None:
        for tag in list(ds.keys()):
            tag = Tag(tag)
            try:
                elem = ds[tag]
            except Exception:  # noqa: BLE001 - a value we cannot even read cannot be vetted
                logger.debug("removing unreadable element %s", tag)
                del ds[tag]
                continue
            action = self._action_for(tag, elem)
            self._apply(ds, tag, elem, action)

    def _action_for(self, tag: BaseTag, elem: DataElement) -> str:
        if tag.is_private:
            return "X"
        group = tag.group
        if 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            return "X"  # curves and overlays (burned-in graphics, comments)
        code = _TAG_ACTIONS.get(tag)
        if code is not None:
            return _resolve(code, elem.VR)
        if group == _PATIENT_GROUP:
            return "X"
        if elem.VR == "UI":
            return "U" if self._uid_is_instance(tag, elem) else "K"
        if elem.VR == "SQ":
            return "recurse"
        return "K"

    @staticmethod
    def _uid_is_instance(tag: BaseTag, elem: DataElement) -> bool:
        keyword = keyword_for_tag(tag) or ""
        if keyword.endswith("ClassUID") or "TransferSyntax" in keyword:
            return False
        if keyword in _KEPT_UID_KEYWORDS:
            return False
        values = elem.value if elem.VM > 1 else [elem.value]
        registered = all(
            str(v).startswith("1.2.840.10008.") or str(v) in UID_dictionary for v in values if v
        )
        return not registered

    def _apply(self, ds: Dataset, tag: BaseTag, elem: DataElement, action: str) -> None:
        if action == "X":
            del ds[tag]
        elif tag == _PATIENT_ID_TAG:
            raw = "" if elem.value is None else str(elem.value)
            elem.value = self.patient_key(raw) if raw else ""
        elif action == "Z":
            elem.value = elem.empty_value
        elif action == "D":
            elem.value = _DUMMY_BY_VR.get(elem.VR, elem.empty_value)
        elif action == "U":
            elem.value = self._remap_value(elem)
        elif action == "recurse" and elem.VR == "SQ" and elem.value is not None:
            for item in elem.value:
                self._clean(item)
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
        for tag in list(meta.keys()):
            tag = Tag(tag)
            code = _TAG_ACTIONS.get(tag)
            if code is None:
                continue
            action = _resolve(code, meta[tag].VR)
            if action == "X":
                del meta[tag]
            elif action == "U":
                meta[tag].value = self._remap_value(meta[tag])


# -- reading DICOM bytes safely --------------------------------------------------------------

DEFAULT_MAX_PIXELS = 50_000_000
_DEFLATED = "1.2.840.10008.1.2.1.99"
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_INFLATE_BASE = 16 * 1024 * 1024
_INFLATE_PER_PIXEL = 6  # 3 samples x 16 bits: the largest common uncompressed pixel
_INFLATE_CHUNK = 4 * 1024 * 1024
_MAX_MESSAGE = 300


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


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
    limit = _INFLATE_BASE + _INFLATE_PER_PIXEL * max_pixels
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
        raise ImageError(f"corrupt deflated DICOM: {_short(exc)}", "invalid") from exc


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
        return pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken files
        kind = "truncated" if isinstance(exc, EOFError) else "invalid"
        raise ImageError(f"cannot parse DICOM: {_short(exc)}", kind) from exc


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
    detail = _short(last) if last is not None else "unknown error"
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
    try:
        _ensure_file_meta(ds)
        clean = deidentifier.deidentify(ds)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ImageError(f"cannot de-identify DICOM: {_short(exc)}", "invalid") from exc
    return _write(clean), safe_metadata(clean)


__all__ = [
    "BASIC_PROFILE",
    "DEFAULT_MAX_PIXELS",
    "Deidentifier",
    "deidentify_bytes",
    "read_dicom",
    "safe_metadata",
]
