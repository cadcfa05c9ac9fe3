"""DICOMweb without a network: endpoint URIs, QIDO queries and answers, credentials, multipart
bodies, the auth file's mode, and the SR built for one scored instance."""

from __future__ import annotations

import base64
import os
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medray.workers import dicomweb, sr
from medray.workers.errors import ConfigError
from medray.workers.specs import build_spec


def test_endpoint_maps_to_http_and_refuses_credentials_in_the_uri() -> None:
    ep = dicomweb.parse_endpoint("dicomweb://pacs.example:8042/dicom-web/")
    assert (ep.uri, ep.http) == ("dicomweb://pacs.example:8042/dicom-web",
                                 "http://pacs.example:8042/dicom-web")
    assert dicomweb.parse_endpoint("dicomwebs://pacs/x").http == "https://pacs/x"
    with pytest.raises(ConfigError, match="--auth-file"):
        dicomweb.parse_endpoint("dicomweb://user:pw@pacs/dicom-web")


def test_instance_uri_round_trips() -> None:
    ep = dicomweb.parse_endpoint("dicomweb://127.0.0.1:8042/dicom-web")
    inst = dicomweb.Instance("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert dicomweb.parse_instance_uri(dicomweb.instance_uri(ep, inst)) == (ep, inst)
    with pytest.raises(ConfigError):
        dicomweb.parse_instance_uri("s3://bucket/studies/1/series/2/instances/3")


@pytest.mark.parametrize(("given", "dicom"), [
    ("20240101-20240131", "20240101-20240131"),
    ("2024-01-01-2024-01-31", "20240101-20240131"),
    ("2024-01-01-", "20240101-"),
    ("-20240131", "-20240131"),
    ("20240105", "20240105"),
])
def test_study_date_ranges(given: str, dicom: str) -> None:
    assert dicomweb.parse_date_range(given) == dicom


@pytest.mark.parametrize("bad", ["", "-", "2024-13-01-2024-12-31", "20240201-20240101",
                                 "yesterday"])
def test_bad_study_dates_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="--study-date"):
        dicomweb.parse_date_range(bad)


def test_one_query_per_modality_with_the_date_and_filters() -> None:
    queries = dicomweb.qido_queries("20240101-20240131", dicomweb.parse_modalities("dx, CR"),
                                    dicomweb.parse_qido_filters(["BodyPartExamined=CHEST"]))
    assert queries == [
        [("StudyDate", "20240101-20240131"), ("BodyPartExamined", "CHEST"), ("Modality", "CR")],
        [("StudyDate", "20240101-20240131"), ("BodyPartExamined", "CHEST"), ("Modality", "DX")],
    ]


@pytest.mark.parametrize("bad", ["PatientID=123", "00100020=123", "AccessionNumber=A1",
                                 "limit=5", "Modality=CR", "novalue", "bad key=1"])
def test_identifying_reserved_or_malformed_qido_filters_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="--qido"):
        dicomweb.parse_qido_filters([bad])


def test_qido_answer_parsing() -> None:
    doc = [{"0020000D": {"vr": "UI", "Value": ["1.2"]}, "0020000E": {"vr": "UI", "Value": ["1.3"]},
            "00080018": {"vr": "UI", "Value": ["1.4"]}}]
    assert dicomweb.parse_qido_answer(doc) == [dicomweb.Instance("1.2", "1.3", "1.4")]
    with pytest.raises(ValueError, match="00080018"):
        dicomweb.parse_qido_answer([{**doc[0], "00080018": {"vr": "UI", "Value": ["x"]}}])
    with pytest.raises(ValueError):
        dicomweb.parse_qido_answer({"not": "a list"})
    report = {**doc[0], "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.33"]}}
    assert dicomweb.parse_qido_answer([report]) == []  # an SR (medray's own, say) is no image


def test_credentials_basic_and_bearer_never_shown() -> None:
    basic = dicomweb.parse_auth("alice:s3cret\n")
    assert basic.header() == "Basic " + base64.b64encode(b"alice:s3cret").decode()
    assert "s3cret" not in repr(basic) and "s3cret" not in str(basic)
    assert dicomweb.parse_auth("Bearer abc.def").header() == "Bearer abc.def"
    for bad in ("", "alice", "Bearer ", "Bearer a b"):
        with pytest.raises(ConfigError) as err:
            dicomweb.parse_auth(bad)
        assert "abc" not in err.value.message


def test_multipart_round_trip() -> None:
    content_type, body = dicomweb.build_multipart([b"first\r\n--x", b"second"])
    assert dicomweb.split_multipart(content_type, body) == [b"first\r\n--x", b"second"]
    with pytest.raises(ValueError):
        dicomweb.split_multipart("application/json", body)


def test_stow_failures() -> None:
    assert dicomweb.stow_failures({"00081198": {"vr": "SQ"}}) == []
    doc = {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.9"]}}]}}
    assert dicomweb.stow_failures(doc) == ["1.9"]


def test_auth_file_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medray.cluster.infra import dicomweb_client

    path = tmp_path / "auth"
    path.write_text("u:p")
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        dicomweb_client.load_auth(str(path))
    path.chmod(0o600)
    assert dicomweb_client.load_auth(str(path)).header().startswith("Basic ")
    monkeypatch.setenv("MEDRAY_DICOMWEB_AUTH", "Bearer tok")
    assert dicomweb_client.load_auth(None).header() == "Bearer tok"
    monkeypatch.delenv("MEDRAY_DICOMWEB_AUTH")
    assert dicomweb_client.load_auth(None) is None


def test_the_auth_env_var_is_not_passed_to_jobs() -> None:
    from medray.cluster.infra import env

    assert env.DICOMWEB_AUTH == "MEDRAY_DICOMWEB_AUTH"
    assert env.DICOMWEB_AUTH not in env.PASS_TO_JOBS


def test_stage_spec_dicomweb_options() -> None:
    spec = build_spec("stage", {"source": "dicomweb://h:1/dw", "dataset": "d",
                                "study_date": "20240101-20240131", "modality": "CR"})
    assert spec.study_date == "20240101-20240131"
    with pytest.raises(ConfigError, match="dicomweb:// source only"):
        build_spec("stage", {"source": "/data", "dataset": "d", "since_last": True})
    with pytest.raises(ConfigError, match="--qido"):
        build_spec("stage", {"source": "dicomweb://h/dw", "dataset": "d",
                             "qido": ["PatientName=DOE"]})


def _finding(run: str = "run-1") -> sr.Finding:
    return sr.Finding(run, "tiny", 3, True, "youden", (
        sr.LabelResult("normal", 0.25, False, 0.5), sr.LabelResult("pneumonia", 0.75, True, 0.5)))


def test_sr_states_model_scores_decisions_and_the_research_notice() -> None:
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    built = sr.build_sr(sr.original_from_json(original.to_json_dict()), _finding())
    back = pydicom.dcmread(BytesIO(sr.sr_bytes(built)))
    assert back.StudyInstanceUID == original.StudyInstanceUID
    assert back.PatientID == original.PatientID  # the PACS files it with the patient's study
    ref = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == original.SeriesInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    texts = [str(i.get("TextValue", "")) for i in back.ContentSequence]
    assert any(t.startswith(sr.NOTICE) for t in texts)
    assert "pneumonia: positive (operating point youden, threshold 0.5)" in texts
    nums = [float(i.MeasuredValueSequence[0].NumericValue) for i in back.ContentSequence
            if i.ValueType == "NUM"]
    assert nums == [0.25, 0.75]
    assert "not a diagnosis" in back.SeriesDescription


def test_sr_uids_are_deterministic_per_run_and_instance() -> None:
    original = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    first = sr.build_sr(sr.original_from_json(original.to_json_dict()), _finding())
    again = sr.build_sr(sr.original_from_json(original.to_json_dict()), _finding())
    other = sr.build_sr(sr.original_from_json(original.to_json_dict()), _finding("run-2"))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID,
                                                               again.SeriesInstanceUID)
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert len(first.SOPInstanceUID) <= 64 and os.path.commonprefix(
        [first.SOPInstanceUID, "2.25."]) == "2.25."


@pytest.mark.parametrize("args", [
    # --publish-to needs the run committed first: refused before the score job is submitted
    ["score", "--dataset", "d", "--model", "m", "--publish-to", "dicomweb://h/dw", "--no-wait"],
    ["score", "--dataset", "d", "--model", "m", "--publish-to", "dicomweb://u:p@h/dw"],
    ["stage", "dicomweb://h/dw", "--dataset", "d", "--qido", "PatientID=123"],
    ["stage", "dicomweb://h/dw", "--dataset", "d", "--study-date", "20240231-"],
    ["stage", "./folder", "--dataset", "d", "--since-last"],
    ["publish", "run-1", "--to", "s3://bucket/x"],
])
def test_bad_pacs_usage_exits_2_before_submitting(args: list[str], tmp_path: Path) -> None:
    import subprocess

    from tests.support.paths import MEDRAY

    proc = subprocess.run([MEDRAY, *args, "--lake", str(tmp_path / "lake")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": "http://127.0.0.1:9"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
