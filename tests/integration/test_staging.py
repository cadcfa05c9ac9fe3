"""`medray stage` through the real CLI on a real local Ray cluster, into local and S3 lakes,
from local folders and from the embedded S3 server. Every format, bad input, de-identification
of DICOM (every byte of the lake scanned for PHI), versions and reuse."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from tests.support.cli import cli_json, run_cli
from tests.support.data import bomb_png, small_npz

pytestmark = [pytest.mark.integration]


# ---------------------------------------------------------------------------- helpers
def _s3fs(home: Path, endpoint: str) -> pafs.S3FileSystem:
    creds = json.loads((home / "lake" / "credentials.json").read_text())
    return pafs.S3FileSystem(access_key=creds["access_key"], secret_key=creds["secret_key"],
                             endpoint_override=endpoint.split("//")[1], scheme="http",
                             region="us-east-1")


def _upload(folder: Path, fs: pafs.S3FileSystem, dest: str) -> str:
    """Copy a local folder to s3://dest with plain pyarrow; returns the s3:// URI."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with fs.open_output_stream(f"{dest}/{path.relative_to(folder).as_posix()}") as out:
                out.write(path.read_bytes())
    return f"s3://{dest}"


class LakeView:
    """Reads a lake (local folder or s3://) with plain pyarrow, as any reader would."""

    def __init__(self, uri: str, home: Path, s3: dict | None) -> None:
        if uri.startswith("s3://"):
            assert s3 is not None
            self.fs: pafs.FileSystem = _s3fs(home, s3["endpoint"])
            self.root = uri.removeprefix("s3://")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), uri

    def files(self, rel: str = "") -> list[str]:
        sel = pafs.FileSelector(f"{self.root}/{rel}".rstrip("/"), recursive=True,
                                allow_not_found=True)
        return sorted(i.path[len(self.root) + 1:] for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File)

    def read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(f"{self.root}/{rel}") as fh:
            return fh.read()

    def json(self, rel: str) -> dict:
        return json.loads(self.read(rel))

    def table(self, rel: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read(rel)))

    def shards(self, manifest: dict) -> pa.Table:
        return pa.concat_tables([self.table(s["path"]) for s in manifest["shards"]])


def _stage(src: str | Path, dataset: str, lake: str, *args: str, env: dict | None = None
           ) -> dict:
    return cli_json("stage", str(src), "--dataset", dataset, "--lake", lake, *args, env=env)


def _noise_png(path: Path, seed: int, size: int = 32, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8),
                    mode).save(path)
    return path


def _bad_corpus(folder: Path) -> dict[str, str]:
    """Broken inputs of every kind, inside a label folder; name -> expected error type."""
    bad = folder / "broken"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "zero.png").write_bytes(b"")
    whole = _noise_png(bad / "whole.png", 5, size=64).read_bytes()
    (bad / "whole.png").unlink()
    (bad / "truncated.png").write_bytes(whole[: len(whole) // 3])
    (bad / "notes.jpg").write_text("not an image, only text with a .jpg name\n" * 20)
    bomb_png(bad / "bomb.png")  # claims 40000 x 40000 pixels
    (bad / "volume.nii").write_bytes(b"\x5c\x01\x00\x00" + b"\x00" * 400)
    return {"zero.png": "empty", "truncated.png": "truncated", "notes.jpg": "not_an_image",
            "bomb.png": "too_large", "volume.nii": "unsupported"}


# ---------------------------------------------------------------------------- folders + images
def _variants(root: Path) -> dict[str, Path]:
    """JPEG/PNG variants as real collections have them, in train/val/test split folders."""
    rng = np.random.default_rng(3)
    made = {}

    def save(rel: str, img: Image.Image, **kw) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, **kw)
        made[rel] = path

    gray = Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8), "L")
    rgb = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8), "RGB")
    ramp16 = np.tile(np.linspace(1000, 3000, 40, dtype=np.uint16), (40, 1))
    save("train/normal/gray8.png", gray)
    save("train/normal/gray16.png", Image.fromarray(ramp16))
    save("train/normal/palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE))
    save("train/normal/rgba.png", rgb.convert("RGBA"))
    save("train/normal/la.png", gray.convert("LA"))
    save("train/pneumonia/rgb.jpg", rgb, quality=90)
    save("train/pneumonia/gray.jpeg", gray, quality=90)
    save("train/pneumonia/cmyk.jpg", rgb.convert("CMYK"), quality=90)
    save("val/pneumonia/progressive.jpg", rgb, quality=80, progressive=True)
    save("test/normal/flipped.png", gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    shutil.copy(made["train/normal/gray8.png"], root / "test" / "normal" / "dup_of_gray8.png")
    return made


def test_folder_splits_and_image_variants_local(tmp_path, local_lake, ray_cluster, medray_home):
    made = _variants(tmp_path / "src")
    res = _stage(tmp_path / "src", "variants", local_lake, "--image-size", "32",
                 "--channels", "3", "--shard-mb", "1")
    assert res["errors"] == 0
    assert res["duplicates"] == 1 and res["images"] == len(made)  # the copy counted once
    lake = LakeView(local_lake, medray_home, None)
    manifest = lake.json("datasets/variants/1/manifest.json")
    assert manifest["channel_layout"] == "rgb" and manifest["channels"] == 3
    assert manifest["labels"] == ["normal", "pneumonia"] and manifest["splits_from_source"]
    # the copy in test/ sorts before train/normal/gray8.png: the first copy is the one kept
    assert manifest["counts"] == {"test": {"normal": 2}, "train": {"normal": 4, "pneumonia": 3},
                                  "val": {"pneumonia": 1}}
    rows = lake.shards(manifest)
    assert rows.num_rows == len(made)
    by_name = {Path(u).name: i for i, u in enumerate(rows.column("source_uri").to_pylist())}
    made["test/normal/dup_of_gray8.png"] = made.pop("train/normal/gray8.png")
    for rel, path in made.items():
        i = by_name[Path(rel).name]
        assert rows.column("image_id")[i].as_py() == hashlib.sha256(path.read_bytes()).hexdigest()
        assert len(rows.column("pixels")[i].as_py()) == 32 * 32 * 3
        assert rows.column("split")[i].as_py() == rel.split("/")[0]
    assert "dup_of_gray8.png" in by_name and "gray8.png" not in by_name
    ramp = np.frombuffer(rows.column("pixels")[by_name["gray16.png"]].as_py(), np.uint8)
    assert ramp.min() <= 5 and ramp.max() >= 250  # 16-bit windowed to the full 8-bit range
    for shard in manifest["shards"]:
        data = lake.read(shard["path"])
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(0).compression \
            == "ZSTD"
    shown = json.loads(run_cli("datasets", "show", "variants", "--lake", local_lake,
                               "--json").stdout)
    assert shown["counts"] == manifest["counts"] and shown["images"] == len(made)


# ---------------------------------------------------------------------------- bad input
def test_bad_input_from_s3_goes_to_the_errors_table(tmp_path, s3_lake, s3_server, ray_cluster,
                                                    medray_home):
    src = tmp_path / "src"
    for i in range(14):
        _noise_png(src / ("a" if i % 2 else "b") / f"ok{i}.png", i)
    expected = _bad_corpus(src)
    fs = _s3fs(medray_home, s3_server["endpoint"])
    uri = _upload(src, fs, f"{s3_lake.removeprefix('s3://')}-src/collection")
    res = _stage(uri, "messy", s3_lake, "--image-size", "28", "--max-errors", "50%")
    assert res["images"] == 14 and res["errors"] == len(expected)
    lake = LakeView(s3_lake, medray_home, s3_server)
    manifest = lake.json("datasets/messy/1/manifest.json")
    errors = pa.concat_tables([lake.table(f) for f in manifest["error_files"]])
    got = {Path(u).name: (t, m) for u, t, m in zip(*(errors.column(c).to_pylist() for c in
                                                     ("source_uri", "error_type", "message")),
                                                   strict=True)}
    assert {k: v[0] for k, v in got.items()} == expected
    assert all(m for _, m in got.values())
    assert all(u.startswith(uri) for u in errors.column("source_uri").to_pylist())
    assert manifest["errors_by_type"] == {t: 1 for t in expected.values()}
    assert manifest["counts"]["train"]  # unsplit source: patient-hash splits were assigned


def test_max_errors_exceeded_fails_and_leaves_nothing(tmp_path, local_lake, ray_cluster,
                                                      medray_home):
    src = tmp_path / "src"
    for i in range(6):
        _noise_png(src / "a" / f"ok{i}.png", i)
    _bad_corpus(src)
    proc = run_cli("stage", str(src), "--dataset", "toobad", "--lake", local_lake,
                   "--image-size", "28", "--max-errors", "2", check=False)
    assert proc.returncode == 2  # bad input found on the cluster still exits 2
    assert "--max-errors" in proc.stderr
    listed = cli_json("datasets", "list", "--lake", local_lake)
    assert not [d for d in listed if d["dataset"] == "toobad"]
    left = LakeView(local_lake, medray_home, None).files("datasets")
    # shards and errors of the failed attempt were tidied away; its version number stays
    # claimed, so no later staging reuses it
    assert left == ["datasets/toobad/1/_CLAIM.json"], left


# ---------------------------------------------------------------------------- CSV manifests
def test_chestxray14_style_csv_manifest(tmp_path, local_lake, ray_cluster, medray_home):
    root = tmp_path / "cxr"
    findings = ["Atelectasis|Effusion", "No Finding", "Mass", "Effusion", "No Finding"]
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID"]
    for patient in range(12):
        for k in range(3):
            name = f"{patient:08d}_{k:03d}.png"
            _noise_png(root / f"images_{1 + patient % 2:03d}" / "images" / name,
                       patient * 10 + k)
            lines.append(f"{name},{findings[(patient + k) % 5]},{k},{patient}")
    lines += ["../../etc/passwd,Mass,0,99", "/etc/hostname,Mass,0,98",
              "99999999_000.png,Mass,0,97"]
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    res = _stage(root / "Data_Entry_2017.csv", "cxr", local_lake, "--image-size", "28",
                 "--val-percent", "25", "--test-percent", "25")
    assert res["images"] == 36 and res["errors"] == 3
    lake = LakeView(local_lake, medray_home, None)
    manifest = lake.json("datasets/cxr/1/manifest.json")
    assert manifest["multi_label"] and manifest["labels"] == ["Atelectasis", "Effusion", "Mass"]
    assert manifest["errors_by_type"] == {"unsafe_path": 2, "missing": 1}
    rows = lake.shards(manifest).to_pylist()
    by_name = {Path(r["source_uri"]).name: r for r in rows}
    assert by_name["00000000_000.png"]["labels"] == ["Atelectasis", "Effusion"]
    assert by_name["00000000_001.png"]["labels"] == []  # No Finding: known negative
    splits: dict[str, set[str]] = {}
    for r in rows:
        splits.setdefault(r["patient_key"], set()).add(r["split"])
    assert len(splits) == 12 and all(len(s) == 1 for s in splits.values())  # by patient
    assert {s for v in splits.values() for s in v} == {"train", "val", "test"}
    assert not any(k in {str(p) for p in range(12)} for k in splits)  # keys are hashed
    assert sum(manifest["images_by_split"].values()) == 36


# ---------------------------------------------------------------------------- npz
def test_medmnist_npz_local(tmp_path, local_lake, ray_cluster, medray_home, pneumonia_npz):
    src = small_npz(tmp_path / "pneu.npz", {"train": 200, "val": 40, "test": 40})
    res = _stage(src, "pneu", local_lake, "--image-size", "28", "--label-names",
                 "normal,pneumonia")
    data = np.load(src)
    unique = {hashlib.sha256(data[f"{s}_images"][i].tobytes() + str((28, 28)).encode())
              .hexdigest() for s in ("train", "val", "test") for i in range(len(data[
                  f"{s}_images"]))}
    assert res["images"] == len(unique) and res["errors"] == 0
    assert res["images"] + res["duplicates"] == 280
    manifest = LakeView(local_lake, medray_home, None).json("datasets/pneu/1/manifest.json")
    assert manifest["labels"] == ["normal", "pneumonia"] and not manifest["multi_label"]
    assert manifest["counts"]["val"]["normal"] + manifest["counts"]["val"]["pneumonia"] <= 40
    rows = LakeView(local_lake, medray_home, None).shards(manifest)
    first = rows.filter(pc.equal(rows.column("source_uri"), f"{src}#train_images/0"))
    np.testing.assert_array_equal(np.frombuffer(first.column("pixels")[0].as_py(), np.uint8),
                                  data["train_images"][0].ravel())


# ---------------------------------------------------------------------------- DICOM + PHI
PHI = {
    "PatientName": "ZZPHI^NAME^7731", "PatientID": "ZZPHIPID4419",
    "InstitutionName": "ZZPHI GENERAL HOSPITAL", "AccessionNumber": "ZZACC55821",
    "ReferringPhysicianName": "ZZPHI^REFDOC", "OperatorsName": "ZZPHI^OPERATOR",
    "OtherPatientIDs": "ZZPHIOTHER88", "PatientAddress": "ZZPHI 12 MAIN STREET",
    "StudyDate": "19230517", "SeriesDate": "19230518", "AcquisitionDate": "19230519",
    "ContentDate": "19230520", "PatientBirthDate": "19010203", "StudyID": "ZZSTUDY31",
    "StudyInstanceUID": "1.2.826.0.1.3680043.9.7731.11",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.9.7731.12",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.9.7731.13",
}


def _phi_dicom(base: str, path: Path, n: int, **extra) -> Path:
    ds = pydicom.dcmread(get_testdata_file(base))
    for key, value in {**PHI, **extra}.items():
        setattr(ds, key, value)
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.9.7731.2{n}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.add_new(0x00110010, "LO", "ZZPRIVATE CREATOR")
    ds.add_new(0x00111001, "LO", "ZZPHIPRIVATEVALUE")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def _real_phi(names: list[str]) -> set[str]:
    """Identifying values of pydicom's own test files (their patients are fictional)."""
    values = set()
    for name in names:
        ds = pydicom.dcmread(get_testdata_file(name))
        for kw in ("PatientName", "PatientID", "InstitutionName", "StudyDate",
                   "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            value = str(ds.get(kw) or "")
            # MR_small's "institution" is its vendor's name, which Manufacturer keeps (allowed)
            if value and value not in str(ds.get("Manufacturer") or ""):
                values.add(value)
    return values


def _dicom_folder(folder: Path) -> set[str]:
    real = ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "examples_overlay.dcm"]
    for i, name in enumerate(real):
        shutil.copy(get_testdata_file(name), folder / f"real_{i}.dcm")
    shutil.copy(get_testdata_file("rtdose.dcm"), folder / "cine.dcm")  # 15 frames: rejected
    shutil.copy(get_testdata_file("rtplan.dcm"), folder / "plan.dcm")  # no pixels: rejected
    _phi_dicom("MR_small.dcm", folder / "phi_m2.dcm", 1)
    _phi_dicom("MR_small.dcm", folder / "phi_m1.dcm", 2, PhotometricInterpretation="MONOCHROME1")
    _phi_dicom("CT_small.dcm", folder / "phi_ct.dcm", 3)
    markers = {v for v in PHI.values()} | {"ZZPRIVATE", "ZZPHIPRIVATEVALUE",
                                            "1.2.826.0.1.3680043.9.7731.2"}
    return markers | _real_phi(real)


def _assert_no_phi(lake: LakeView, markers: set[str]) -> int:
    """Every byte of every object of the lake, Parquet decoded column by column too."""
    needles = [m.encode() for m in markers] + [m.replace("^", " ").encode() for m in markers]
    scanned = 0
    for rel in lake.files():
        data = lake.read(rel)
        blobs = [data]
        if rel.endswith(".parquet"):
            for column in pq.read_table(io.BytesIO(data)).columns:
                for value in column.to_pylist():
                    if value is None:
                        continue
                    blobs.append(value if isinstance(value, bytes) else
                                 json.dumps(value, default=str).encode())
        for blob in blobs:
            for needle in needles:
                assert needle not in blob, f"PHI {needle!r} found in {rel}"
        scanned += 1
    return scanned


def _by_digest(folder: Path) -> dict[str, str]:
    """image_id -> file name: DICOM rows name their file by a pseudonym, never by its path."""
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in folder.rglob("*")
            if p.is_file()}


def _check_dicom_version(lake: LakeView, name: str, folder: Path) -> None:
    manifest = lake.json(f"datasets/{name}/1/manifest.json")
    assert manifest["format"] == "dicom" and manifest["images"] == 7
    assert manifest["errors_by_type"] == {"multi_frame": 1, "no_pixel_data": 1}
    names = _by_digest(folder)
    rows = {names[r["image_id"]]: r for r in lake.shards(manifest).to_pylist()}
    for r in rows.values():
        assert r["source_uri"].startswith("dicom:") and len(r["source_uri"]) == 38
        meta = json.loads(r["metadata"])
        assert set(meta) <= {"modality", "body_part_examined", "view_position", "rows",
                             "columns", "bits_stored", "photometric_interpretation",
                             "pixel_spacing", "burned_in_annotation", "transfer_syntax",
                             "sop_instance_uid"}
        assert meta["sop_instance_uid"].startswith("2.25.")  # remapped, never the original
        assert r["labels"] is None  # a flat DICOM folder: ground truth unknown
        original = pydicom.dcmread(io.BytesIO(r["original"]))
        assert original.PatientIdentityRemoved == "YES"
        assert not str(original.get("PatientName") or "")
        assert original.SOPInstanceUID == meta["sop_instance_uid"]
    m1 = np.frombuffer(rows["phi_m1.dcm"]["pixels"], np.uint8).astype(int)
    m2 = np.frombuffer(rows["phi_m2.dcm"]["pixels"], np.uint8).astype(int)
    assert np.abs(m1 + m2 - 255).max() <= 1  # MONOCHROME1 is inverted
    keys = {r["patient_key"] for n, r in rows.items() if n.startswith("phi_")}
    assert len(keys) == 1 and len(next(iter(keys))) == 32  # one salted key for the patient
    assert len({r["split"] for n, r in rows.items() if n.startswith("phi_")}) == 1


def test_dicom_local_folder_is_deidentified(tmp_path, local_lake, ray_cluster, medray_home):
    folder = tmp_path / "dicom"
    folder.mkdir()
    markers = _dicom_folder(folder)
    res = _stage(folder, "ct", local_lake, "--image-size", "32", "--keep-original",
                 "--max-errors", "3")
    assert res["images"] == 7 and res["errors"] == 2
    lake = LakeView(local_lake, medray_home, None)
    _check_dicom_version(lake, "ct", folder)
    assert _assert_no_phi(lake, markers) >= 4  # manifest, shards, errors, job record


def test_dicom_from_s3_into_s3_lake_is_deidentified(tmp_path, s3_lake, s3_server, ray_cluster,
                                                    medray_home):
    folder = tmp_path / "dicom"
    folder.mkdir()
    markers = _dicom_folder(folder)
    fs = _s3fs(medray_home, s3_server["endpoint"])
    uri = _upload(folder, fs, f"{s3_lake.removeprefix('s3://')}-src/dicom")
    res = _stage(uri, "ct", s3_lake, "--image-size", "32", "--keep-original", "--format",
                 "dicom", "--max-errors", "3")
    assert res["images"] == 7
    lake = LakeView(s3_lake, medray_home, s3_server)
    _check_dicom_version(lake, "ct", folder)
    assert _assert_no_phi(lake, markers) >= 4


# ---------------------------------------------------------------------------- versions
def test_grown_source_makes_a_version_that_reuses_shards(tmp_path, local_lake, ray_cluster,
                                                         medray_home):
    src = tmp_path / "src"
    for i in range(120):
        _noise_png(src / ("a" if i % 3 else "b") / f"img{i:03d}.png", i)
    opts = ("--image-size", "32", "--shard-mb", "0.03")
    first = _stage(src, "grow", local_lake, *opts)
    lake = LakeView(local_lake, medray_home, None)
    v1_bytes = lake.read("datasets/grow/1/manifest.json")
    v1 = json.loads(v1_bytes)
    assert first["images"] == 120 and len(v1["shards"]) >= 3
    rows = [s["rows"] for s in v1["shards"]]
    assert min(rows) >= 0.5 * max(rows)  # balanced, no small last shard
    for i in range(120, 150):
        _noise_png(src / "a" / f"img{i:03d}.png", i)
    shutil.copy(src / "a" / "img001.png", src / "b" / "copy_of_1.png")
    second = _stage(src, "grow", local_lake, *opts)
    v2 = lake.json("datasets/grow/2/manifest.json")
    assert (second["version"], second["images"], second["reused_images"]) == (2, 150, 120)
    assert second["new_images"] == 30 and second["duplicates"] == 1
    assert [s["path"] for s in v1["shards"]] == [s["path"] for s in v2["shards"]][:len(
        v1["shards"])]  # the old shards, listed as they are
    new = [s for s in v2["shards"] if s["path"].startswith("datasets/grow/2/")]
    new_ids = set(pa.concat_tables([lake.table(s["path"]) for s in new])
                  .column("image_id").to_pylist())
    assert new_ids == {hashlib.sha256((src / "a" / f"img{i:03d}.png").read_bytes()).hexdigest()
                       for i in range(120, 150)}
    assert lake.read("datasets/grow/1/manifest.json") == v1_bytes  # versions are immutable
    # an image removed from the source: only the shard that held it is rewritten
    gone = hashlib.sha256((src / "a" / "img002.png").read_bytes()).hexdigest()
    (src / "a" / "img002.png").unlink()
    third = _stage(src, "grow", local_lake, *opts)
    v3 = lake.json("datasets/grow/3/manifest.json")
    assert third["images"] == 149 and third["new_images"] == 0
    held = [s["path"] for s in v2["shards"]
            if gone in lake.table(s["path"]).column("image_id").to_pylist()]
    kept = {s["path"] for s in v3["shards"]}
    assert held[0] not in kept and len(kept & {s["path"] for s in v2["shards"]}) >= \
        len(v2["shards"]) - 2
    ids = lake.shards(v3).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 149 and gone not in ids


def test_a_decoder_crash_becomes_an_error_row(tmp_path, local_lake, ray_cluster, medray_home):
    src = tmp_path / "src"
    for i in range(10):
        _noise_png(src / "a" / f"ok{i}.png", i)
    # two poison inputs in one batch: each kills the decoder once; neither may loop forever
    _noise_png(src / "a" / "poison1.png", 98)
    _noise_png(src / "a" / "poison2.png", 99)
    res = _stage(src, "crashy", local_lake, "--image-size", "28", "--max-errors", "2",
                 env={"MEDRAY_FAULT": "stage_crash_on:poison"})
    assert res["images"] == 10 and res["errors"] == 2
    lake = LakeView(local_lake, medray_home, None)
    manifest = lake.json("datasets/crashy/1/manifest.json")
    assert manifest["errors_by_type"] == {"crashed": 2}
    errors = lake.table(manifest["error_files"][0])
    assert sorted(Path(u).name for u in errors.column("source_uri").to_pylist()) == [
        "poison1.png", "poison2.png"]


# ---------------------------------------------------------------------------- re-staging (#14)
def _described(lake: LakeView, manifest: dict) -> dict[str, tuple]:
    return {r["image_id"]: (r["labels"], r["split"], r["patient_key"], r["source_uri"])
            for r in lake.shards(manifest).to_pylist()}


def test_restaging_the_same_npz_keeps_every_label(tmp_path, s3_lake, s3_server, ray_cluster,
                                                  medray_home):
    """The second `make demo`: re-staging one .npz made a version of unlabelled rows."""
    src = small_npz(tmp_path / "pneu.npz", {"train": 60, "val": 20, "test": 20})
    opts = ("--image-size", "28", "--label-names", "normal,pneumonia")
    first = _stage(src, "again", s3_lake, *opts)
    second = _stage(src, "again", s3_lake, *opts)
    assert (second["version"], second["reused_images"], second["new_images"]) == (
        2, first["images"], 0)
    lake = LakeView(s3_lake, medray_home, s3_server)
    v1, v2 = (lake.json(f"datasets/again/{v}/manifest.json") for v in (1, 2))
    assert _described(lake, v2) == _described(lake, v1)  # row for row
    assert v2["counts"] == v1["counts"]
    assert not any("(unknown)" in c for c in v2["counts"].values()), v2["counts"]


def test_an_image_moved_from_train_to_test_moves(tmp_path, local_lake, ray_cluster, medray_home):
    src = tmp_path / "src"
    for i in range(9):
        _noise_png(src / ("train", "val", "test")[i % 3] / "a" / f"img{i}.png", i)
    _stage(src, "moving", local_lake, "--image-size", "16")
    (src / "train" / "a" / "img0.png").rename(src / "test" / "a" / "img0.png")
    res = _stage(src, "moving", local_lake, "--image-size", "16")
    assert (res["moved_images"], res["reused_images"], res["new_images"]) == (1, 9, 0)
    lake = LakeView(local_lake, medray_home, None)
    manifest = lake.json("datasets/moving/2/manifest.json")
    assert manifest["moved_images"] == 1
    assert manifest["images_by_split"] == {"test": 4, "train": 2, "val": 3}
    rows = {Path(r["source_uri"]).name: r for r in lake.shards(manifest).to_pylist()}
    assert rows["img0.png"]["split"] == "test"
    assert rows["img0.png"]["source_uri"] == str(src / "test" / "a" / "img0.png")


def test_stagings_of_one_name_at_once_get_distinct_versions(tmp_path, s3_lake, s3_server,
                                                            ray_cluster, medray_home):
    import subprocess

    from tests.support.paths import MEDRAY

    sources = {}
    for k, n in enumerate((5, 8, 11)):
        sources[k] = tmp_path / f"src{k}"
        for i in range(n):
            _noise_png(sources[k] / "x" / f"{i}.png", 1000 * k + i, size=16)
    procs = {k: subprocess.Popen([MEDRAY, "stage", str(src), "--dataset", "race", "--lake",
                                  s3_lake, "--image-size", "16", "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, src in sources.items()}
    results = {}
    for k, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results[k] = json.loads(out.strip().splitlines()[-1])
    assert sorted(r["version"] for r in results.values()) == [1, 2, 3]
    lake = LakeView(s3_lake, medray_home, s3_server)
    for k, res in results.items():
        manifest = lake.json(f"datasets/race/{res['version']}/manifest.json")
        assert manifest["job_id"] == res["job_id"] and manifest["source"] == str(sources[k])
        assert manifest["images"] == res["images"] == len(list(sources[k].rglob("*.png")))
        staged = {Path(u).parent.parent for u in lake.shards(manifest).column(
            "source_uri").to_pylist()}
        assert staged == {sources[k]}


# ---------------------------------------------------------------------------- purge (#13)
def test_a_changed_profile_reuses_nothing_and_delete_purges_the_old_version(
        tmp_path, s3_lake, s3_server, ray_cluster, medray_home):
    src = tmp_path / "src"
    for i in range(8):
        _noise_png(src / "a" / f"{i}.png", 300 + i, size=16)
    first = _stage(src, "purge", s3_lake, "--image-size", "16")
    lake = LakeView(s3_lake, medray_home, s3_server)
    # as if v1 had been staged by a medray with an older de-identification profile
    fs, root = lake.fs, lake.root
    v1 = lake.json("datasets/purge/1/manifest.json")
    v1["content_options"]["deid_profile"] = "medray-deid-1/ps3.15-2024b"
    with fs.open_output_stream(f"{root}/datasets/purge/1/manifest.json") as out:
        out.write(json.dumps(v1).encode())
    second = _stage(src, "purge", s3_lake, "--image-size", "16")
    assert (second["reused_images"], second["new_images"]) == (0, first["images"])
    v2 = lake.json("datasets/purge/2/manifest.json")
    assert not {s["path"] for s in v2["shards"]} & {s["path"] for s in v1["shards"]}
    third = _stage(src, "purge", s3_lake, "--image-size", "16", "--no-reuse")
    assert (third["version"], third["reused_images"]) == (3, 0)
    gone = cli_json("datasets", "delete", "purge:1", "--lake", s3_lake)
    assert gone["removed_files"] >= 2 and gone["kept_files"] == []
    assert lake.files("datasets/purge/1") == []
    listed = [d["version"] for d in cli_json("datasets", "list", "--lake", s3_lake)
              if d["dataset"] == "purge"]
    assert listed == [2, 3]
    assert lake.shards(lake.json("datasets/purge/2/manifest.json")).num_rows == first["images"]
    # a version whose shards a later version lists keeps them: delete v3 after a reusing v4
    fourth = _stage(src, "purge", s3_lake, "--image-size", "16")
    assert fourth["reused_images"] == first["images"]
    kept = cli_json("datasets", "delete", "purge:3", "--lake", s3_lake)["kept_files"]
    assert kept and all(p.startswith("datasets/purge/3/shards/") for p in kept)
    assert lake.shards(lake.json("datasets/purge/4/manifest.json")).num_rows == first["images"]
    assert run_cli("datasets", "delete", "purge", "--lake", s3_lake, check=False
                   ).returncode == 2  # the version must be named
