"""A scored instance as a DICOM Comprehensive Structured Report (highdicom), for the PACS.

One SR per original instance: it names the model and its version, gives each label's score
(calibrated when the model card says so) and the operating point's decision, references the
original study, series and SOP instance, and says in its title, its series description and a
text item that it is a research result, not a diagnosis. The SR joins the original study (a
viewer shows it beside the image); its series and SOP instance UIDs derive from the run id and
the original UIDs (``derive_uid``), so publishing a run again stores the same instances, never
new ones.

Pure code: the original's attributes come in as a pydicom data set (from the PACS, in memory);
nothing is read or written here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

if TYPE_CHECKING:
    from highdicom.sr import CodedConcept

NOTICE = "RESEARCH RESULT, NOT A DIAGNOSIS"
SERIES_DESCRIPTION = "medray research result - not a diagnosis"
SERIES_NUMBER = 9901
SCHEME = "99MEDRAY"  # a private coding scheme (PS3.16 8.2: designators starting with 99)
# the attributes of the original an SR needs (patient, study, series, instance modules)
ORIGINAL_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
    "ReferringPhysicianName", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
)


def derive_uid(*parts: str) -> str:
    """A UID ``2.25.<128-bit integer>`` from ``parts``: same parts, same UID (PS3.5 B.2)."""
    digest = hashlib.sha256("\x00".join(("medray-sr", *parts)).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big') or 1}"


@dataclass(frozen=True)
class LabelResult:
    label: str
    score: float
    positive: bool           # the operating point's decision
    threshold: float | None  # None: argmax of a single-label model


@dataclass(frozen=True)
class Finding:
    """What the SR states about one instance."""

    run_id: str
    model: str
    model_version: int
    calibrated: bool
    operating_point: str     # the rule that chose the thresholds, or "argmax"
    labels: Sequence[LabelResult]


def sr_uids(run_id: str, series_uid: str, sop_uid: str) -> tuple[str, str]:
    """(series, SOP instance) UIDs of the SR of one original instance in one run."""
    return (derive_uid("series", run_id, series_uid),
            derive_uid("instance", run_id, sop_uid))


def _concept(value: str, meaning: str, scheme: str = SCHEME) -> CodedConcept:
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def notice_text(finding: Finding) -> str:
    return (f"{NOTICE}. Produced by the machine-learning model {finding.model} version "
            f"{finding.model_version} (medray run {finding.run_id}) for research use only; "
            "not reviewed by a physician, not for clinical decisions.")


def build_sr(original: Dataset, finding: Finding) -> Dataset:
    """The SR data set of ``finding`` about the instance ``original`` describes."""
    import highdicom.sr as hsr

    contains = hsr.RelationshipTypeValues.CONTAINS
    items: list[Dataset] = [
        hsr.TextContentItem(_concept("121106", "Comment", "DCM"), notice_text(finding),
                            relationship_type=contains),
        hsr.TextContentItem(_concept("111001", "Algorithm Name", "DCM"), finding.model,
                            relationship_type=contains),
        hsr.TextContentItem(_concept("111003", "Algorithm Version", "DCM"),
                            str(finding.model_version), relationship_type=contains),
        hsr.ImageContentItem(_concept("121112", "Source of Measurement", "DCM"),
                             str(original.SOPClassUID), str(original.SOPInstanceUID),
                             relationship_type=contains),
    ]
    kind = "calibrated score" if finding.calibrated else "score (not calibrated)"
    for i, res in enumerate(finding.labels):
        items.append(hsr.NumContentItem(
            _concept(f"SCORE{i:03d}", f"{res.label} {kind}"), float(res.score),
            _concept("1", "no units", "UCUM"), relationship_type=contains))
        rule = ("argmax over the labels" if res.threshold is None else
                f"operating point {finding.operating_point}, threshold {res.threshold:.4g}")
        items.append(hsr.TextContentItem(
            _concept(f"DECISION{i:03d}", f"{res.label} decision"),
            f"{res.label}: {'positive' if res.positive else 'negative'} ({rule})",
            relationship_type=contains))
    root = hsr.ContainerContentItem(_concept("RESEARCH", "Research result, not a diagnosis"))
    root.ContentSequence = DicomSequence(items)
    series_uid, sop_uid = sr_uids(finding.run_id, str(original.SeriesInstanceUID),
                                  str(original.SOPInstanceUID))
    sr = hsr.ComprehensiveSR(
        evidence=[original], content=root, series_instance_uid=series_uid,
        series_number=SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1,
        manufacturer="medray", series_description=SERIES_DESCRIPTION, is_complete=True,
        is_final=False, is_verified=False)
    return sr


def original_from_json(doc: dict[str, object]) -> Dataset:
    """The original's attributes an SR needs, from its DICOM JSON (WADO-RS metadata);
    everything else (bulk data included) is left out."""
    from pydicom import datadict

    keep = {f"{datadict.tag_for_keyword(k):08X}" for k in ORIGINAL_KEYWORDS}
    return Dataset.from_json({tag: value for tag, value in doc.items() if tag in keep})


def sr_bytes(sr: Dataset) -> bytes:
    out = BytesIO()
    sr.save_as(out, enforce_file_format=True)
    return out.getvalue()
