"""Subgroups end to end through the CLI (issue 15): a ChestX-ray14-style CSV with Patient Age,
Patient Gender and View Position columns is staged, scored by a user's registered model and
reported with --subgroups; the subgroup table matches scikit-learn on the committed predictions
joined with the CSV, and a gap built into the data is flagged while a random one is not. The
same from DICOM files, whose View Position staging keeps as a de-identified attribute.

The data is made so the answer is known: a finding makes the left half of an image brighter
than the right (the other way round without it), and the model scores left minus right, except
in AP images, whose halves are random: AUROC near 1 on PA, near 0.5 on AP. (Left against right
survives DICOM's per-image min-max windowing, which a plain brightness would not.) Sex is
assigned at random, so its gap is noise.
"""

from __future__ import annotations

import csv
import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from sklearn import metrics as skm

from tests.support.cli import cli_json, run_cli

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
PATIENTS, IMAGES_PER_PATIENT = 100, 3
ATTRS = "Patient Age,Patient Gender,View Position"


def _csv_dataset(root: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for p in range(PATIENTS):
        age, sex = int(rng.integers(5, 90)), str(rng.choice(["M", "F"]))
        for k in range(IMAGES_PER_PATIENT):
            view = "AP" if (p + k) % 2 else "PA"
            sick = bool(rng.random() < 0.4)
            img = _image(rng, sick, view)
            name = f"{p:04d}_{k:03d}.png"
            Image.fromarray(img).save(root / name)
            rows.append({"Image Index": name, "Finding Labels": "Pneumonia" if sick
                         else "No Finding", "Patient ID": p, "Patient Age": age,
                         "Patient Gender": sex, "View Position": view})
    path = root / "Data_Entry.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _image(rng: np.random.Generator, sick: bool, view: str) -> np.ndarray:
    """28x28 uint8: left half brighter with the finding, darker without; random in AP."""
    if view == "AP":
        left, right = rng.uniform(60, 200, 2)
    else:
        left, right = (170, 90) if sick else (90, 170)
    img = np.empty((28, 28))
    img[:, :14] = rng.normal(left, 12, (28, 14))
    img[:, 14:] = rng.normal(right, 12, (28, 14))
    return np.clip(img, 0, 255).astype(np.uint8)


def _brightness_model(path: Path) -> Path:
    """A user's Keras model: sigmoid of (left half - right half) brightness, set by hand."""
    import keras

    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(1, activation="sigmoid")])
    kernel = np.zeros((28, 28), np.float32)
    kernel[:, :14], kernel[:, 14:] = 0.08 / 392, -0.08 / 392
    model.layers[-1].set_weights([kernel.reshape(784, 1), np.zeros(1, np.float32)])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def reported(tmp_path_factory, s3_server, ray_cluster):
    tmp = tmp_path_factory.mktemp("subgroups")
    lake = f"s3://{s3_server['bucket']}/subgroups-{uuid.uuid4().hex[:8]}"
    src = tmp / "src"
    src.mkdir()
    csv_path = _csv_dataset(src)
    cli_json("stage", str(csv_path), "--dataset", "cxr", "--format", "csv", "--image-size",
             "28", "--lake", lake)
    cli_json("models", "register", str(_brightness_model(tmp / "bright.keras")), "--name",
             "bright", "--labels", "Pneumonia", "--multi-label", "--lake", lake)
    run = cli_json("score", "--dataset", "cxr", "--model", "bright:1", "--lake", lake)
    proc = run_cli("report", run["run_id"], "--subgroups", ATTRS, "--n-boot", "500",
                   "--lake", lake, "--json", check=False)
    from medray.cluster.store.lake import Lake

    return {"lake": Lake(lake), "run": run["run_id"], "csv": csv_path, "proc": proc}


def _result(reported) -> dict:
    """The report's JSON result; fails (in the test, not the fixture) when it did not run."""
    proc = reported["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _joined(reported) -> list[dict]:
    lake, run = reported["lake"], reported["run"]
    marker = lake.read_json(f"runs/{run}/_COMMITTED.json")
    preds = pa.concat_tables([lake.read_parquet(f"runs/{run}/{f}") for f in marker["files"]])
    with reported["csv"].open() as fh:
        by_name = {r["Image Index"]: r for r in csv.DictReader(fh)}
    out = []
    for r in preds.to_pylist():
        row = by_name[r["source_uri"].rsplit("/", 1)[-1]]
        out.append({**row, "y": int("Pneumonia" in r["true_labels"]),
                    "s": r["score_Pneumonia"]})
    return out


def _band(age: int) -> str:
    return "<18" if age < 18 else "18-39" if age < 40 else "40-59" if age < 60 else \
        "60-79" if age < 80 else ">=80"


def test_subgroup_table_matches_sklearn_per_group(reported):
    _result(reported)
    lake, run = reported["lake"], reported["run"]
    rows = lake.read_parquet(f"runs/{run}/report/subgroups.parquet").to_pylist()
    data = _joined(reported)
    threshold = 0.5  # a registered user's model has no operating point: the default
    keys = {"Patient Age": lambda r: _band(int(r["Patient Age"])),
            "Patient Gender": lambda r: r["Patient Gender"],
            "View Position": lambda r: r["View Position"]}
    assert {r["attribute"] for r in rows} == set(keys)
    for attribute, key in keys.items():
        mine = {r["group"]: r for r in rows if r["attribute"] == attribute}
        assert set(mine) == {key(d) for d in data}
        for group, r in mine.items():
            members = [d for d in data if key(d) == group]
            y = np.array([d["y"] for d in members])
            s = np.array([d["s"] for d in members], dtype=np.float64)
            assert r["images"] == len(members) and r["positives"] == y.sum()
            if 0 < y.sum() < len(y):
                assert r["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-6)
            assert r["sensitivity"] == pytest.approx(
                skm.recall_score(y, s >= threshold, zero_division=np.nan), abs=1e-9,
                nan_ok=True)
            assert r["specificity"] == pytest.approx(
                skm.recall_score(1 - y, s < threshold, zero_division=np.nan), abs=1e-9,
                nan_ok=True)


def test_the_built_in_gap_is_flagged_and_the_random_one_is_not(reported):
    _result(reported)
    lake, run = reported["lake"], reported["run"]
    gaps = {(g["attribute"], g["metric"]): g for g in
            lake.read_parquet(f"runs/{run}/report/subgroup_gaps.parquet").to_pylist()}
    view = gaps[("View Position", "auroc")]
    assert (view["high"], view["low"]) == ("PA", "AP")
    assert view["gap_lo"] > 0 and view["flagged"]
    sex = gaps[("Patient Gender", "auroc")]
    assert sex["gap_lo"] <= 0 <= sex["gap_hi"] and not sex["flagged"]
    summary = _result(reported)["summary"]
    assert summary["subgroup_attributes"] == ATTRS.split(",")
    assert summary["flagged_gaps"] >= 1
    html = lake.read_bytes(f"runs/{run}/report/report.html").decode()
    assert "<h2>Subgroups</h2>" in html and "GAP" in html
    card = lake.read_json("models/bright/1/card.json")
    entry = card["evaluations"][run]
    assert {(g["attribute"], g["metric"]) for g in entry["subgroup_gaps"]} == set(gaps)


def test_unknown_subgroup_attribute_names_the_ones_there(reported):
    proc = run_cli("report", reported["run"], "--subgroups", "Weight", "--n-boot", "0",
                   "--lake", reported["lake"].uri, check=False)
    assert proc.returncode == 2
    assert "no attribute 'Weight'" in proc.stderr and "View Position" in proc.stderr


def test_an_identifying_attribute_column_is_refused(tmp_path, s3_server, ray_cluster):
    """--attributes never keeps an identifier: exit 2 before anything is staged."""
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    manifest = tmp_path / "list.csv"
    manifest.write_text("Image Index,Finding Labels,Patient Age,Patient Name\n"
                        "a.png,Pneumonia,58,Doe^Jane\n")
    lake = f"s3://{s3_server['bucket']}/refuse-{uuid.uuid4().hex[:8]}"
    proc = run_cli("stage", str(manifest), "--dataset", "named", "--attributes",
                   "Patient Age,Patient Name", "--lake", lake, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "refusing 'Patient Name'" in proc.stderr and "Doe" not in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------------ DICOM
def _dicom(path: Path, pixels: np.ndarray, view: str, patient: str) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition, ds.PatientID = "CR", view, patient
    ds.Rows = ds.Columns = 28
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_view_position_subgroups_end_to_end(tmp_path, s3_server, ray_cluster):
    """DICOM radiographs in root/<label>/: the view position staging keeps is a subgroup
    attribute the report finds by itself (no --subgroups), and the AP gap is flagged."""
    rng = np.random.default_rng(1)
    root = tmp_path / "dcm"
    truth = {}
    for p in range(80):
        for k in range(3):
            sick = bool(rng.random() < 0.4)
            view = "AP" if (p + k) % 2 else "PA"
            folder = root / ("Pneumonia" if sick else "normal")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{p:03d}_{k}.dcm"
            _dicom(path, _image(rng, sick, view), view, f"P{p:03d}")
            # staging names a DICOM input by a pseudonym: join on the image id (its SHA-256)
            truth[hashlib.sha256(path.read_bytes()).hexdigest()] = (int(sick), view)
    lake_uri = f"s3://{s3_server['bucket']}/dcm-{uuid.uuid4().hex[:8]}"
    cli_json("stage", str(root), "--dataset", "dcm", "--image-size", "28", "--lake", lake_uri)
    model = _brightness_model(tmp_path / "bright.keras")
    cli_json("models", "register", str(model), "--name", "bright", "--labels", "Pneumonia",
             "--multi-label", "--lake", lake_uri)
    run = cli_json("score", "--dataset", "dcm", "--model", "bright:1", "--lake", lake_uri)
    out = cli_json("report", run["run_id"], "--n-boot", "300", "--lake", lake_uri)
    assert out["summary"]["subgroup_attributes"] == ["view_position"]
    assert out["summary"]["ci_unit"] == "patient"
    from medray.cluster.store.lake import Lake

    lake = Lake(lake_uri)
    base = f"runs/{run['run_id']}/report"
    rows = {r["group"]: r for r in lake.read_parquet(f"{base}/subgroups.parquet").to_pylist()}
    marker = lake.read_json(f"runs/{run['run_id']}/_COMMITTED.json")
    preds = pa.concat_tables([lake.read_parquet(f"runs/{run['run_id']}/{f}")
                              for f in marker["files"]])
    by_view: dict[str, tuple[list[int], list[float]]] = {"AP": ([], []), "PA": ([], [])}
    for r in preds.to_pylist():
        sick, view = truth[r["image_id"]]
        assert int("Pneumonia" in r["true_labels"]) == sick
        by_view[view][0].append(sick)
        by_view[view][1].append(r["score_Pneumonia"])
    for view, (y, s) in by_view.items():
        assert rows[view]["images"] == len(y)
        assert rows[view]["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-6)
    gap = next(g for g in lake.read_parquet(f"{base}/subgroup_gaps.parquet").to_pylist()
               if g["metric"] == "auroc")
    assert (gap["high"], gap["low"]) == ("PA", "AP") and gap["flagged"]
