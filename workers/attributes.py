"""Patient attributes as typed shard columns: which source columns may be kept, and their values
typed (an age in whole years as an integer, everything else as text).

A CSV manifest such as ChestX-ray14's Data_Entry_2017.csv carries ``Patient Age`` (``58``, or
``058Y`` in some releases), ``Patient Gender`` (M/F) and ``View Position`` (PA/AP); a DICOM
header carries ViewPosition, PatientAge (``058Y``) and PatientSex. The report breaks its
metrics down by these (``subgroups``). Kept columns keep their source names; DICOM's are named
``view_position``, ``patient_age`` and ``patient_sex``.

What is never kept: a column whose name says it identifies someone or something traceable to
them (names, IDs, record and accession numbers, dates, addresses, contact details). Naming one
is a ``ConfigError``. Ages above 89 are stored as 90, HIPAA Safe Harbor's "90 or older".

A value that cannot be read (an age of ``abc``, a negative one) becomes null and is counted;
it never fails the staging. Pure code: no I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from medray.workers.errors import ConfigError

AGE, TEXT = "age", "text"
AGE_CAP = 90           # years: HIPAA Safe Harbor aggregates every age over 89 into "90 or older"
MAX_AGE_YEARS = 130    # an age above this is an error in the source, not a patient
MAX_TEXT = 64          # characters kept of a text value
# What ``--attributes auto`` keeps where a CSV has it: the usual subgroup attributes
# (normalised names, see ``normalise``).
AUTO = ("patientage", "age", "patientsex", "sex", "patientgender", "gender", "viewposition",
        "view", "appa", "frontallateral")
# Words in a column name that say it identifies a person, or dates or places them.
IDENTIFYING_WORDS = frozenset({
    "name", "names", "id", "ids", "mrn", "uid", "identifier", "accession", "ssn", "number",
    "no", "record", "birth", "dob", "date", "datetime", "time", "address", "street", "city",
    "zip", "zipcode", "postcode", "postal", "phone", "telephone", "fax", "email", "mail", "url",
    "ip", "account", "license", "licence", "insurance", "physician", "doctor", "institution"})
DICOM_VIEW, DICOM_AGE, DICOM_SEX = "view_position", "patient_age", "patient_sex"

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_AGE_TEXT = re.compile(r"^(\d{1,3}(?:\.\d+)?)\s*([DWMY]?)$", re.IGNORECASE)
_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def words(name: str) -> list[str]:
    """'Patient Age', 'patient_age' and 'PatientAge' -> ['patient', 'age']; 'MRN' -> ['mrn']."""
    return [w.lower() for w in _WORD.findall(str(name))]


def normalise(name: str) -> str:
    return "".join(words(name))


def kind_of(name: str) -> str:
    """AGE when a word of the column name is 'age' (not 'Image Index'), else TEXT."""
    return AGE if "age" in words(name) else TEXT


def identifying(name: str) -> str | None:
    """Why a column of this name may identify a patient (None: it does not say so)."""
    hit = sorted(set(words(name)) & IDENTIFYING_WORDS)
    return f"its name has {hit[0]!r}" if hit else None


def choose(option: str, columns: Sequence[str], reserved: Iterable[str | None] = ()
           ) -> list[str]:
    """The CSV columns ``--attributes`` keeps: ``auto`` (the usual ones present), ``none``, or
    a comma-separated list, each of which must exist and must not identify anyone.

    ``reserved``: the columns staging already uses (path, labels, patient, split): never kept.
    """
    text = (option or "").strip()
    if text.lower() == "none" or not text:
        return []
    used = {c for c in reserved if c}
    if text.lower() == "auto":
        return [c for c in columns if normalise(c) in AUTO and c not in used
                and identifying(c) is None]
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in columns:
            near = [c for c in columns if normalise(c) == normalise(name)]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"--attributes: the manifest has no column {name!r}{hint} "
                              f"(columns: {list(columns)})")
        if name in used:
            raise ConfigError(f"--attributes: {name!r} is the manifest's path, label, patient "
                              "or split column, not a patient attribute")
        why = identifying(name)
        if why:
            raise ConfigError(f"--attributes: refusing {name!r}: {why}, so it may identify a "
                              "patient; staging never keeps names, IDs, record or accession "
                              "numbers, dates or addresses (SECURITY.md)")
    if len(set(names)) != len(names):
        raise ConfigError(f"--attributes names a column twice: {names}")
    return names


def age_years(value: Any) -> tuple[int | None, bool]:
    """(whole years capped at AGE_CAP, or None; whether the value was bad).

    Reads numbers, '58', '58.0' and DICOM age strings ('058Y', '006M', '010W', '003D');
    empty means unknown (not bad); text, negative or above MAX_AGE_YEARS is bad."""
    if value is None or isinstance(value, bool):
        return None, isinstance(value, bool)
    if isinstance(value, int | float):
        years = float(value)
    else:
        text = str(value).strip()
        if not text:
            return None, False
        m = _AGE_TEXT.match(text)
        if not m:
            return None, True
        years = float(m.group(1)) * _UNIT_YEARS[m.group(2).upper()]
    if not math.isfinite(years) or years < 0 or years > MAX_AGE_YEARS:
        return None, True
    return min(int(years), AGE_CAP), False


def text_value(value: Any) -> str | None:
    """Stripped text, at most MAX_TEXT characters; None when empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text[:MAX_TEXT] or None


def typed(columns: Sequence[tuple[str, str]], raw: dict[str, Any]
          ) -> tuple[dict[str, Any], list[str]]:
    """(column -> typed value, the columns whose value was bad and became null)."""
    out: dict[str, Any] = {}
    bad: list[str] = []
    for name, kind in columns:
        if kind == AGE:
            years, wrong = age_years(raw.get(name))
            out[name] = years
            if wrong:
                bad.append(name)
        else:
            out[name] = text_value(raw.get(name))
    return out, bad


def fields(columns: Sequence[tuple[str, str]]) -> list[pa.Field]:
    """The shard fields of kept attribute columns: int16 years for an age, else string."""
    return [pa.field(name, pa.int16() if kind == AGE else pa.string()) for name, kind in columns]


def dicom_columns(retain: Iterable[str]) -> list[tuple[str, str]]:
    """The attribute columns of DICOM inputs: the view always (it says nothing of who the
    patient is); age and sex only under the patient-characteristics option (docs/deid.md)."""
    cols = [(DICOM_VIEW, TEXT)]
    if "patient-characteristics" in retain:
        cols += [(DICOM_AGE, AGE), (DICOM_SEX, TEXT)]
    return cols
