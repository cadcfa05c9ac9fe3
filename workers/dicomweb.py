"""DICOMweb without the network: endpoint URIs, QIDO-RS queries and answers, credentials,
multipart bodies (PS3.18: QIDO-RS search, WADO-RS retrieve, STOW-RS store).

medray names a DICOMweb service ``dicomweb://HOST[:PORT]/PATH`` (plain HTTP, for a PACS on a
trusted network or loopback) or ``dicomwebs://...`` (HTTPS). One instance found by QIDO-RS is
the item URI ``<service>/studies/<S>/series/<E>/instances/<I>``: what the staging decoders
retrieve, and what the private linkage keeps so results can be published back against the
original UIDs. Credentials never appear in a URI.

Pure code: strings and bytes in and out; the HTTP client lives in the cluster layer.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from medray.workers.errors import ConfigError

SCHEMES = ("dicomweb://", "dicomwebs://")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DATE = r"\d{4}-?\d{2}-?\d{2}"
_DATE_RANGE = re.compile(rf"^(?P<start>{_DATE})?(?:(?P<dash>-)(?P<end>{_DATE})?)?$")
_MODALITY = re.compile(r"^[A-Z0-9]{1,16}$")
_KEYWORD = re.compile(r"^([A-Za-z][A-Za-z0-9]{0,63}|[0-9A-Fa-f]{8})$")
# QIDO keys medray sets itself, and keys whose values identify a patient or a study: a value
# given on the command line lands in the job's spec and history, where identifiers never go.
RESERVED_KEYS = frozenset({"limit", "offset", "includefield", "fuzzymatching", "StudyDate",
                           "Modality"})
IDENTIFYING_KEYS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthName", "OtherPatientIDs",
    "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName",
    "IssuerOfPatientID", "AccessionNumber", "StudyID", "StudyInstanceUID",
    "SeriesInstanceUID", "SOPInstanceUID", "ReferringPhysicianName", "PerformingPhysicianName",
    "OperatorsName", "InstitutionName", "StudyDescription", "SeriesDescription",
    "00100010", "00100020", "00100030", "00080050", "0020000D", "0020000E", "00080018"})
# QIDO-RS answers: attribute tags as 8 hex digits (PS3.18 F.2 DICOM JSON model)
STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"
SOP_CLASS = "00080016"
# structured reports (medray's own results among them) and other documents: never images
DOCUMENT_CLASSES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.104.")
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE = "00081198", "00081199"


def is_dicomweb(source: str) -> bool:
    return source.lower().startswith(SCHEMES)


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb service: ``uri`` as medray writes it, ``http`` the base URL requests use."""

    uri: str
    http: str


def parse_endpoint(uri: str) -> Endpoint:
    """``dicomweb://host[:port]/path`` -> its HTTP base URL; ConfigError naming the fix."""
    lower = uri.lower()
    scheme = "https" if lower.startswith("dicomwebs://") else "http"
    if not is_dicomweb(uri):
        raise ConfigError(f"not a DICOMweb URI: {uri!r}: write dicomweb://HOST[:PORT]/PATH")
    rest = uri.split("://", 1)[1].rstrip("/")
    host, _, path = rest.partition("/")
    if "@" in host:
        raise ConfigError("credentials do not go in the DICOMweb URI (it is written to job "
                          "specs and logs): use --auth-file or MEDRAY_DICOMWEB_AUTH")
    if not host or not re.match(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$",
                                host):
        raise ConfigError(f"bad host in DICOMweb URI {uri!r}: write dicomweb://HOST[:PORT]/PATH")
    if "?" in path or "#" in path:
        raise ConfigError(f"the DICOMweb URI {uri!r} takes no query: use --qido KEY=VALUE")
    base = f"{uri.split('://', 1)[0].lower()}://{host}" + (f"/{path}" if path else "")
    return Endpoint(base, f"{scheme}://{host}" + (f"/{path}" if path else ""))


# ---------------------------------------------------------------------------- instances
@dataclass(frozen=True)
class Instance:
    """One DICOM instance by its three original UIDs."""

    study: str
    series: str
    sop: str

    def path(self) -> str:
        return f"studies/{self.study}/series/{self.series}/instances/{self.sop}"


def instance_uri(endpoint: Endpoint, inst: Instance) -> str:
    return f"{endpoint.uri}/{inst.path()}"


def parse_instance_uri(uri: str) -> tuple[Endpoint, Instance]:
    """An item URI back into its service and original UIDs; ConfigError when it is not one."""
    match = re.match(r"^(?P<base>.+)/studies/(?P<st>[0-9.]+)/series/(?P<se>[0-9.]+)"
                     r"/instances/(?P<sop>[0-9.]+)$", uri)
    if not match or not is_dicomweb(uri):
        raise ConfigError("not a DICOMweb instance URI")
    inst = Instance(match["st"], match["se"], match["sop"])
    for uid in (inst.study, inst.series, inst.sop):
        check_uid(uid)
    return parse_endpoint(match["base"]), inst


def check_uid(uid: str) -> str:
    if not _UID.match(uid) or len(uid) > 64:
        raise ConfigError("a DICOM UID must be digits and dots, at most 64 characters")
    return uid


# ---------------------------------------------------------------------------- queries
def parse_date_range(value: str) -> str:
    """``FROM-TO`` (``YYYYMMDD`` or ``YYYY-MM-DD`` each side, either side open) as a DICOM
    date range ``YYYYMMDD-YYYYMMDD``; a single date matches that day."""
    match = _DATE_RANGE.match(value.strip())
    if not value.strip() or not match or not (match["start"] or match["end"]):
        raise ConfigError(f"--study-date {value!r}: write FROM-TO as YYYYMMDD-YYYYMMDD or "
                          "YYYY-MM-DD-YYYY-MM-DD (either side may be left open)")
    days = []
    for part in (match["start"], match["end"]):
        if part is None:
            days.append("")
            continue
        digits = part.replace("-", "")
        try:
            dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
        except ValueError:
            raise ConfigError(f"--study-date {value!r}: {part} is not a calendar date") from None
        days.append(digits)
    if days[0] and days[1] and days[0] > days[1]:
        raise ConfigError(f"--study-date {value!r}: the range ends before it starts")
    return days[0] if not match["dash"] else f"{days[0]}-{days[1]}"


def parse_modalities(value: str) -> list[str]:
    """``CR,DX`` -> ["CR", "DX"]: DICOM modality codes (upper case, at most 16 characters)."""
    mods = [m.strip().upper() for m in value.split(",") if m.strip()]
    if not mods or any(not _MODALITY.match(m) for m in mods):
        raise ConfigError(f"--modality {value!r}: give DICOM modality codes, comma-separated "
                          "(CR,DX)")
    return sorted(set(mods))


def parse_qido_filters(values: Sequence[str]) -> list[tuple[str, str]]:
    """``KEY=VALUE`` filters (a DICOM keyword or 8-hex tag): refused when medray sets the key
    itself or when its value would identify a patient or study in the job's records."""
    out = []
    for item in values:
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not _KEYWORD.match(key) or not val.strip():
            raise ConfigError(f"--qido {item!r}: write KEY=VALUE with a DICOM keyword or tag "
                              "(BodyPartExamined=CHEST)")
        if key in RESERVED_KEYS or key.lower() in RESERVED_KEYS:
            raise ConfigError(f"--qido {key}: medray sets it (use --study-date, --modality)")
        if key in IDENTIFYING_KEYS or key.upper() in IDENTIFYING_KEYS:
            raise ConfigError(f"--qido {key}: a patient or study identifier would be kept in the "
                              "job's spec and history; query by date, modality or other "
                              "non-identifying attributes")
        out.append((key, val.strip()))
    return out


def qido_queries(study_date: str | None, modalities: Sequence[str],
                 filters: Iterable[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The parameter lists of the instance-level QIDO-RS searches: one per modality (a
    multi-valued Modality match is not portable across servers), each with the date range
    and the raw filters."""
    base: list[tuple[str, str]] = []
    if study_date:
        base.append(("StudyDate", study_date))
    base.extend(filters)
    if not modalities:
        return [base]
    return [[*base, ("Modality", mod)] for mod in modalities]


def is_document(obj: dict[str, Any]) -> bool:
    """Whether a QIDO-RS result is an SR or encapsulated document (by its SOP class)."""
    values = (obj.get(SOP_CLASS) or {}).get("Value") or [""]
    return str(values[0]).startswith(DOCUMENT_CLASSES)


def parse_qido_answer(doc: Any) -> list[Instance]:
    """Instances of a QIDO-RS JSON answer (a list of DICOM JSON objects); ValueError when the
    answer is not one (the caller makes it a clear failure of the query). Structured reports
    and encapsulated documents (``is_document``) are left out: they are not images."""
    if not isinstance(doc, list):
        raise ValueError("the QIDO-RS answer is not a JSON array")
    out = []
    for obj in doc:
        if not isinstance(obj, dict):
            raise ValueError("a QIDO-RS result is not a JSON object")
        if is_document(obj):
            continue
        uids = []
        for tag in (STUDY_UID, SERIES_UID, SOP_UID):
            values = (obj.get(tag) or {}).get("Value") or []
            if len(values) != 1 or not isinstance(values[0], str) or not _UID.match(values[0]):
                raise ValueError(f"a QIDO-RS result lacks a valid {tag}")
            uids.append(values[0])
        out.append(Instance(*uids))
    return out


# ---------------------------------------------------------------------------- credentials
class Auth:
    """An HTTP Authorization header value; never shown (``repr`` hides it)."""

    def __init__(self, header: str) -> None:
        self._header = header

    def header(self) -> str:
        return self._header

    def __repr__(self) -> str:
        return "Auth(<hidden>)"

    __str__ = __repr__


def parse_auth(text: str) -> Auth:
    """``user:password`` (HTTP basic) or ``Bearer TOKEN``; ConfigError (never quoting it)."""
    value = text.strip()
    if value.lower().startswith("bearer "):
        token = value[7:].strip()
        if not token or any(c.isspace() for c in token):
            raise ConfigError("the DICOMweb credentials say Bearer but hold no single token")
        return Auth(f"Bearer {token}")
    user, sep, password = value.partition(":")
    if not sep or not user or not password or "\n" in value:
        raise ConfigError("DICOMweb credentials must be one line: user:password or "
                          "Bearer TOKEN")
    return Auth("Basic " + base64.b64encode(value.encode("utf-8")).decode("ascii"))


# ---------------------------------------------------------------------------- multipart
def split_multipart(content_type: str, body: bytes) -> list[bytes]:
    """The parts' bodies of a ``multipart/related`` answer (WADO-RS); ValueError if malformed."""
    match = re.search(r'boundary="?([^";]+)"?', content_type, re.IGNORECASE)
    if not content_type.lower().startswith("multipart/") or not match:
        raise ValueError("the answer is not multipart/related")
    delimiter = b"--" + match.group(1).strip().encode("ascii")
    pieces = body.split(delimiter)
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break  # the close delimiter
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part has no header end")
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    if not parts:
        raise ValueError("the multipart answer holds no part")
    return parts


def build_multipart(parts: Sequence[bytes],
                    part_type: str = "application/dicom") -> tuple[str, bytes]:
    """(Content-Type header, body) of a ``multipart/related`` STOW-RS request."""
    boundary = f"medray-{uuid.uuid4().hex}"
    chunks = []
    for data in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode("ascii"))
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return f'multipart/related; type="{part_type}"; boundary={boundary}', b"".join(chunks)


def stow_failures(doc: Any) -> list[str]:
    """The SOP instance UIDs a STOW-RS answer says failed (empty: all stored)."""
    if not isinstance(doc, dict):
        return []
    failed = (doc.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []
    out = []
    for item in failed:
        uid = ((item or {}).get("00081155") or {}).get("Value") or ["?"]
        out.append(str(uid[0]))
    return out
