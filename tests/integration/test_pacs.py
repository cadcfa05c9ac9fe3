"""From the PACS and back, against a real Orthanc (DICOMweb plugin, basic auth on 127.0.0.1):
stage by study date and modality, ``--since-last`` stages only what is new, a PACS stopped
mid-job fails the job cleanly with nothing visible, publish stores one SR per scored instance
(readable by pydicom, referencing the original UIDs) and publishing twice adds nothing; the
PACS password appears in no log, job record or lake file.

The instances are pydicom's test files rewritten with new UIDs and a controlled modality,
study date and (fake) patient, stored through STOW-RS. The tests of this module run in order:
each builds on the PACS and lake state the previous one left.
"""

from __future__ import annotations

import os
import re
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.support import orthanc as pacs_support
from tests.support.cli import cli_json, run_cli
from tests.support.scan import found_in

pytestmark = [pytest.mark.integration]
LABELS = ["normal", "pneumonia"]
SIZE = 28
CR, DX = "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _start() -> pacs_support.Orthanc:
    missing = pacs_support.available()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI installs it (.ci/run: make pacs)")
        pytest.skip(missing)
    return pacs_support.Orthanc().start()


@pytest.fixture(scope="session")
def pacs() -> Any:
    server = _start()
    yield server
    server.remove()


def _uids(data: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(BytesIO(data))
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


@pytest.fixture(scope="module")
def state(pacs: pacs_support.Orthanc, tmp_path_factory: pytest.TempPathFactory,
          ray_cluster: dict) -> dict[str, Any]:
    """Four instances in the PACS, two of them in January 2024 as CR or DX."""
    mk = pacs_support.make_instance
    files = {
        "a": mk("CT_small.dcm", modality="CR", study_date="20240110", patient="ALPHA",
                sop_class=CR),
        "b": mk("MR_small.dcm", modality="DX", study_date="20240120", patient="BRAVO",
                sop_class=DX),
        "c": mk("CT_small.dcm", modality="CR", study_date="20240215", patient="CHARLIE",
                sop_class=CR),                                   # outside the dates
        "d": mk("MR_small.dcm", modality="MR", study_date="20240115", patient="DELTA"),
    }
    pacs.stow(list(files.values()))
    work = tmp_path_factory.mktemp("pacs")
    auth = work / "pacs.auth"
    auth.write_text(pacs.credentials + "\n")
    auth.chmod(0o600)
    return {"uids": {k: _uids(v) for k, v in files.items()}, "lake": str(work / "lake"),
            "auth": str(auth), "work": work, "outputs": []}


def _stage(state: dict[str, Any], pacs: pacs_support.Orthanc, *extra: str,
           modality: tuple[str, ...] = ("--modality", "CR,DX")) -> dict[str, Any]:
    out = cli_json("stage", pacs.uri, "--dataset", "xr", "--lake", state["lake"],
                   "--image-size", str(SIZE), "--auth-file", state["auth"],
                   "--study-date", "2024-01-01-2024-01-31", *modality, *extra)
    state["outputs"].append(repr(out))
    return out


def _staged_sops(lake: str, version: int) -> set[str]:
    """The original SOP UIDs of a version's rows, through its private linkage."""
    from medray.cluster.store import linkage
    from medray.cluster.store.lake import Lake
    from medray.workers import dicomweb

    lk = Lake(lake)
    rows = [lk.read_parquet(s["path"]).column("source_uri").to_pylist()
            for s in lk.read_json(f"datasets/xr/{version}/manifest.json")["shards"]]
    links = linkage.reveal(lk, "xr", version, None)
    return {dicomweb.parse_instance_uri(links[p])[1].sop for part in rows for p in part}


def test_stage_by_study_date_and_modality(state: dict[str, Any],
                                          pacs: pacs_support.Orthanc) -> None:
    out = _stage(state, pacs)
    assert (out["version"], out["images"], out["errors"]) == (1, 2, 0)
    assert _staged_sops(state["lake"], 1) == {state["uids"]["a"][2], state["uids"]["b"][2]}


def test_since_last_stages_only_new_instances(state: dict[str, Any],
                                              pacs: pacs_support.Orthanc) -> None:
    new = pacs_support.make_instance("CT_small.dcm", modality="DX", study_date="20240125",
                                     patient="ECHO", sop_class=DX)
    pacs.stow([new])
    state["uids"]["e"] = _uids(new)
    out = _stage(state, pacs, "--since-last")
    assert (out["version"], out["images"]) == (2, 1)
    assert _staged_sops(state["lake"], 2) == {state["uids"]["e"][2]}
    again = _stage(state, pacs, "--since-last")
    assert again["nothing_new"] is True and again["version"] is None


def test_publish_one_sr_per_scored_instance_and_twice_adds_nothing(
        state: dict[str, Any], pacs: pacs_support.Orthanc) -> None:
    from medray.cluster.store import registry
    from medray.cluster.store.lake import Lake
    from medray.workers.models import ModelCard, build_model

    path = state["work"] / "tiny.keras"
    build_model("small_cnn", SIZE, 1, 2, False, seed=0).save(path)
    card = ModelCard(name="tiny", labels=LABELS, multi_label=False, input_size=SIZE,
                     channels=1, arch="test", source="built by the test, untrained")
    registry.register(Lake(state["lake"]), str(path), card)
    before = set(pacs.instances())
    scored = cli_json("score", "--dataset", "xr:1", "--model", "tiny:1", "--allow-cpu",
                      "--lake", state["lake"], "--publish-to", pacs.uri,
                      "--publish-auth-file", state["auth"])
    state["outputs"].append(repr(scored))
    assert scored["images"] == 2 and scored["published"]["published"] == 2
    added = set(pacs.instances()) - before
    assert len(added) == 2
    originals = {state["uids"][k][2]: state["uids"][k] for k in ("a", "b")}
    seen = set()
    for orthanc_id in added:
        sr = pydicom.dcmread(BytesIO(pacs.instance_file(orthanc_id)))
        assert sr.SOPClassUID == COMPREHENSIVE_SR
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0]
        sop = ref.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        study, series, _ = originals[sop]
        assert (sr.StudyInstanceUID, ref.StudyInstanceUID,
                ref.ReferencedSeriesSequence[0].SeriesInstanceUID) == (study, study, series)
        texts = [str(item.get("TextValue", "")) for item in sr.ContentSequence]
        assert any("NOT A DIAGNOSIS" in t for t in texts)
        assert "tiny" in texts and "not a diagnosis" in sr.SeriesDescription
        assert sum(item.ValueType == "NUM" for item in sr.ContentSequence) == len(LABELS)
        seen.add(sop)
    assert seen == set(originals)
    again = cli_json("publish", scored["run_id"], "--to", pacs.uri, "--auth-file",
                     state["auth"], "--lake", state["lake"])
    state["outputs"].append(repr(again))
    assert again["published"] == 2
    assert set(pacs.instances()) == before | added


def test_published_srs_are_never_staged_as_images(state: dict[str, Any],
                                                  pacs: pacs_support.Orthanc) -> None:
    # any modality now: January holds a, b, e (staged), d (MR) and the two SRs of a and b
    out = _stage(state, pacs, "--since-last", modality=())
    assert (out["version"], out["images"], out["errors"]) == (3, 1, 0)
    assert _staged_sops(state["lake"], 3) == {state["uids"]["d"][2]}


def test_auth_file_readable_by_others_is_refused(state: dict[str, Any],
                                                  pacs: pacs_support.Orthanc) -> None:
    loose = state["work"] / "loose.auth"
    loose.write_text(pacs.credentials)
    loose.chmod(0o644)
    res = run_cli("stage", pacs.uri, "--dataset", "xr", "--lake", state["lake"],
                  "--auth-file", str(loose), check=False)
    assert res.returncode == 2, res.stderr
    assert "chmod 600" in res.stderr


def test_the_password_appears_nowhere(state: dict[str, Any],
                                      pacs: pacs_support.Orthanc) -> None:
    from medray.cluster.store import history
    from medray.cluster.store.lake import Lake

    lake = Path(state["lake"])
    files = [p for p in lake.rglob("*") if p.is_file()]
    assert any(p.parent.name == "jobs" for p in files)  # the job history is among them
    assert any(p.name == "dicomweb.parquet" for p in files)
    # decoded content too: Parquet columns are zstd-compressed
    secrets = {"password": pacs.password, "credentials": pacs.credentials}
    assert [p for p in files if found_in(p.read_bytes(), secrets)] == []
    jobs = [d["job_id"] for d in history.list_history(Lake(state["lake"]))]
    assert len(jobs) >= 5
    for job in jobs:
        assert pacs.password not in run_cli("jobs", "logs", job).stdout
    assert all(pacs.password not in out for out in state["outputs"])
    # nor does a patient identifier or an original UID of the PACS reach the lake
    phi = {"name": "ALPHA^TEST", "id": "PID-ALPHA", "study": state["uids"]["a"][0],
           "sop": state["uids"]["a"][2]}
    assert [p for p in files if found_in(p.read_bytes(), phi)] == []


def test_pacs_stopped_mid_job_fails_cleanly(tmp_path: Path, ray_cluster: dict,
                                            medray_home: Path) -> None:
    from medray.cluster.infra import wire
    from medray.cluster.store import catalog
    from medray.cluster.store.lake import Lake
    from tests.support.faults import wait_job
    from tests.support.waiting import wait_for

    server = _start()
    try:
        server.stow([pacs_support.make_instance("CT_small.dcm", modality="CR",
                                                study_date="20240110", patient=f"P{i}")
                     for i in range(3)])
        auth = tmp_path / "auth"
        auth.write_text(server.credentials)
        auth.chmod(0o600)
        lake = str(tmp_path / "lake")
        job = cli_json("stage", server.uri, "--dataset", "cut", "--lake", lake, "--image-size",
                       str(SIZE), "--auth-file", str(auth), "--no-wait",
                       env={"MEDRAY_FAULT": "stage_pause_after_listing:20"})["job_id"]
        wait_for("the job's QIDO-RS listing", lambda: "QIDO-RS: 3 instances found" in run_cli(
            "jobs", "logs", job).stdout, 120, every=1)
        server.stop()
        status = wait_job(medray_home, job, 300)
        logs = run_cli("jobs", "logs", job).stdout
    finally:
        server.remove()
    assert status == "FAILED"
    assert re.search(r"WADO-RS retrieve: \w+; retry 3 of 3", logs)  # retried, with backoff
    message, code = wire.error_from_logs(logs) or ("", 0)
    assert code == 1 and "unreachable" in message
    assert catalog.committed_versions(Lake(lake), "cut") == []
    left = [p.name for p in (tmp_path / "lake" / "datasets" / "cut").rglob("*") if p.is_file()]
    assert left == ["_CLAIM.json"]  # the claimed number only: no shard, errors or ledger
