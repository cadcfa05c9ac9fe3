"""De-identification through the real CLI into the S3 lake (issue #13), every lake object read
back decoded (Parquet cells, kept originals parsed again with pydicom, JSON) and every job log:

- a DICOM with a marker in every attribute PS3.15 Table E.1-1 lists, and one with them two
  sequences deep, staged with --keep-original from folders named the way PACS exports name
  them (``<FAMILY^GIVEN>_<MRN>/<STUDY_DATE>/``): no marker, no name, MRN or date of a path;
  the linkage reveals the paths to whoever may read it;
- the same with the profile options: only what each option documents survives;
- JPEG and PNG originals kept without their metadata;
- pydicom's own test files with pixels: each staged or an errors row, the job ends, none
  leaks a value of a listed attribute."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file

from medray.workers.deid import DESCRIPTORS, Deidentifier
from medray.workers.deid_table import ACTIONS
from tests.support import faults as h
from tests.support.deid_markers import marker_dicom

pytestmark = [pytest.mark.integration]
FAMILY, GIVEN, MRN, STUDY_DAY = "ZZQFAMILY", "ZZQGIVEN", "ZZQMRN8812", "19350607"
PATH_PHI = (FAMILY, GIVEN, MRN, STUDY_DAY)


def _lake(bucket: str) -> str:
    return f"s3://{bucket}/deid-{uuid.uuid4().hex[:8]}"


def _decoded(blob: bytes, depth: int = 0) -> Iterator[bytes]:
    """What an object holds, read back: Parquet cells, a kept DICOM's element values, JSON
    and anything else as bytes. Pixels are image data, not text: a run of the byte 0x31 is no
    "11111111" (the staged ``pixels`` and a DICOM's PixelData are not searched as text)."""
    if len(blob) > 132 and blob[128:132] == b"DICM":
        ds = pydicom.dcmread(io.BytesIO(blob))
        for elem in [*ds.iterall(), *ds.file_meta]:
            if elem.keyword != "PixelData":
                yield str(elem.value).encode(errors="replace")
        return
    yield blob
    if depth <= 2 and blob[:4] == b"PAR1" and blob[-4:] == b"PAR1":
        table = pq.read_table(io.BytesIO(blob))
        for name, column in zip(table.column_names, table.columns, strict=True):
            for value in column.to_pylist() if name != "pixels" else ():
                if isinstance(value, bytes):
                    yield from _decoded(value, depth + 1)
                elif value is not None:
                    yield json.dumps(value, default=str).encode()


def _lake_hits(home: Path, lake: str, needles: dict[str, str]) -> dict[str, list[str]]:
    fs = h.s3fs(home)
    hits: dict[str, list[str]] = {}
    files = h.lake_files(fs, h.lake_base(lake))
    assert any(f.endswith("manifest.json") for f in files) and len(files) >= 3
    for path in files:
        for part in _decoded(h.read_object(fs, path)):
            for name, value in needles.items():
                if value.encode() in part:
                    hits.setdefault(name, []).append(path.rsplit("/", 3)[-3:][-1])
    return hits


def _stage(outputs: list[str], src: Path, lake: str, dataset: str, *args: str) -> dict:
    res = h.cli_json(outputs, "stage", str(src), "--dataset", dataset, "--image-size", "16",
                     "--keep-original", "--max-errors", "50%", "--lake", lake, *args)
    outputs.append(h.cli(None, "jobs", "logs", res["job_id"]).stdout)
    return res


def _pacs_tree(root: Path) -> dict[str, Path]:
    """Marker DICOMs and two broken files in PACS-export folders whose names are PHI."""
    study = root / f"{FAMILY}^{GIVEN}_{MRN}" / STUDY_DAY / "SERIES1"
    study.mkdir(parents=True)
    files = {"top": study / f"{MRN}_0001.dcm", "nested": study / f"{MRN}_0002.dcm",
             "cine": study / f"{FAMILY}_cine.dcm", "cut": study / f"{FAMILY}_cut.dcm"}
    files["top"].write_bytes(marker_dicom(nested=False).data)
    files["nested"].write_bytes(marker_dicom(nested=True).data)
    shutil.copy(get_testdata_file("rtdose.dcm"), files["cine"])  # 15 frames: an errors row
    files["cut"].write_bytes(marker_dicom().data[:700])  # truncated: an errors row
    return files


def _markers() -> dict[str, str]:
    found = {}
    for nested in (False, True):
        marked = marker_dicom(nested)
        found.update({f"{'nested' if nested else 'top'} {t:08X}": v
                      for t, v in marked.text.items()})
    return found


def test_no_listed_attribute_and_no_path_reaches_the_lake_or_the_logs(
        s3_server, medray_home, ray_cluster, tmp_path):
    files = _pacs_tree(tmp_path / "export")
    lake, outputs = _lake(s3_server["bucket"]), []
    res = _stage(outputs, tmp_path / "export", lake, "pacs", "--format", "dicom")
    assert (res["images"], res["errors"]) == (2, 2)
    markers = _markers()
    needles = {**markers, **{f"path {p}": p for p in PATH_PHI}}
    assert not _lake_hits(medray_home, lake, needles)
    for text in outputs:  # the CLI's output and the job's log
        assert not [n for n, v in needles.items() if v in text], text[-2000:]
    # the lake rows name pseudonyms; the private linkage reveals the paths to its reader
    shown = h.cli_json(None, "datasets", "errors", "pacs:1", "--lake", lake)
    assert all(r["source_uri"].startswith("dicom:") for r in shown)
    revealed = h.cli_json(None, "datasets", "errors", "pacs:1", "--reveal", "--lake", lake)
    assert sorted(r["source_uri"] for r in revealed) == sorted(str(files[k])
                                                               for k in ("cine", "cut"))
    link = medray_home / "linkage"
    parts = list(link.rglob("*.parquet"))
    assert parts and all(p.stat().st_mode & 0o077 == 0 for p in parts)


def test_each_option_keeps_only_what_it_documents(s3_server, medray_home, ray_cluster,
                                                  tmp_path):
    src = tmp_path / "opts"
    src.mkdir()
    marked = marker_dicom()
    (src / "a.dcm").write_bytes(marked.data)
    lake, outputs = _lake(s3_server["bucket"]), []
    _stage(outputs, src, lake, "opts", "--retain", "patient-characteristics", "--retain",
           "longitudinal", "--clean", "descriptors")
    fs = h.s3fs(medray_home)
    base = h.lake_base(lake)
    manifest = json.loads(h.read_object(fs, f"{base}/datasets/opts/1/manifest.json"))
    assert manifest["deidentification"]["options"] == {
        "retain_patient_characteristics": True, "retain_longitudinal_modified_dates": True,
        "clean_descriptors": True, "retain_manufacturer": False}
    shard = pq.read_table(f"{base}/{manifest['shards'][0]['path']}", filesystem=fs)
    ds = pydicom.dcmread(io.BytesIO(shard.column("original")[0].as_py()))
    kept = {"PatientSex", "PatientAge", "PatientSize", "PatientWeight"}
    for keyword in kept:
        assert ds[keyword].value == marked.values[int(pydicom.tag.Tag(keyword))]
    dates = [t for t in marked.values if pydicom.tag.Tag(t) in ds
             and ds[pydicom.tag.Tag(t)].VR == "DA" and ds[pydicom.tag.Tag(t)].value]
    assert len(dates) > 40 and all(ds[pydicom.tag.Tag(t)].value != marked.values[t]
                                   for t in dates)  # every date shifted
    first = dt.datetime.strptime(str(marked.values[dates[0]]), "%Y%m%d").date()
    moved = dt.datetime.strptime(ds[pydicom.tag.Tag(dates[0])].value, "%Y%m%d").date()
    assert 1 <= (first - moved).days <= 3650
    descriptors = {int(pydicom.tag.Tag(k)) for k in DESCRIPTORS}
    survivors = {int(pydicom.tag.Tag(k)) for k in kept} | set(dates) | descriptors | {
        t for t in marked.values if pydicom.tag.Tag(t) in ds and ds[pydicom.tag.Tag(t)].VR
        in ("TM", "DT")}
    needles = {f"{t:08X}": v for t, v in marked.text.items() if t not in survivors}
    assert not _lake_hits(medray_home, lake, needles)
    codes = [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113105", "113107", "113108"]


def test_jpeg_and_png_originals_are_kept_without_metadata(s3_server, medray_home, ray_cluster,
                                                          tmp_path):
    src = tmp_path / "photos" / "x"
    src.mkdir(parents=True)
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "ZZQPNGAUTHOR")
    info.add_itxt("Comment", "ZZQPNGITXT", zip=True)
    Image.fromarray(pixels).save(src / "a.png", pnginfo=info)
    exif = Image.Exif()
    exif[0x013B] = "ZZQJPEGARTIST"
    Image.fromarray(pixels).save(src / "b.jpg", quality=92, exif=exif.tobytes(),
                                 comment=b"ZZQJPEGCOMMENT")
    lake, outputs = _lake(s3_server["bucket"]), []
    res = _stage(outputs, tmp_path / "photos", lake, "photos")
    assert res["images"] == 2
    needles = {n: n for n in ("ZZQPNGAUTHOR", "ZZQPNGITXT", "ZZQJPEGARTIST", "ZZQJPEGCOMMENT")}
    assert not _lake_hits(medray_home, lake, needles)
    fs = h.s3fs(medray_home)
    base = h.lake_base(lake)
    manifest = json.loads(h.read_object(fs, f"{base}/datasets/photos/1/manifest.json"))
    rows = pq.read_table(f"{base}/{manifest['shards'][0]['path']}", filesystem=fs).to_pylist()
    by_name = {Path(r["source_uri"]).name: r for r in rows}
    for name in ("a.png", "b.jpg"):
        original = np.asarray(Image.open(io.BytesIO(by_name[name]["original"])))
        assert np.array_equal(original, np.asarray(Image.open(src / name)))  # pixels kept


def _values(ds: pydicom.Dataset) -> tuple[set[str], set[str]]:
    """(values of the file's listed attributes, six characters or more and not a registered
    UID; values medray keeps on purpose, of attributes the table does not list)."""
    clean = Deidentifier(bytes(range(32))).deidentify(ds)
    kept = {str(e.value) for e in clean.iterall()
            if int(e.tag) not in ACTIONS and e.VR not in ("SQ", "OB", "OW", "UN")}
    listed = set()
    for elem in ds.iterall():
        if int(elem.tag) in ACTIONS and elem.VR not in ("SQ", "OB", "OW", "UN"):
            text = str(elem.value).strip()
            if len(text) >= 6 and not text.startswith("1.2.840.10008."):
                listed.add(text)
    return listed, kept


def test_pydicoms_own_files_stage_or_fail_cleanly_and_leak_no_listed_value(
        s3_server, medray_home, ray_cluster, tmp_path):
    src = tmp_path / "pydicom"
    src.mkdir()
    root = Path(get_testdata_file("MR_small.dcm")).parent
    listed: dict[str, str] = {}
    kept: set[str] = set()
    copied = 0
    for path in sorted(root.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - the corpus holds broken files on purpose
            continue
        if "PixelData" not in ds or path.stat().st_size > 4_000_000:
            continue
        shutil.copy(path, src / path.name)
        copied += 1
        values, on_purpose = _values(ds)
        kept |= on_purpose
        listed.update({f"{path.name}: {v[:40]}": v for v in values})
    # a listed value that is also (part of) a value kept on purpose, in any file of the lake,
    # is no leak: a CodeMeaning "Uncompressed predecessor" and an ImageComments "Uncompressed"
    needles = {n: v for n, v in listed.items() if not any(v in k for k in kept)}
    assert copied > 60 and len(needles) > 100
    lake, outputs = _lake(s3_server["bucket"]), []
    res = h.cli_json(outputs, "stage", str(src), "--dataset", "pydicom", "--image-size", "16",
                     "--keep-original", "--allow-burned-in", "--max-errors", "100%",
                     "--lake", lake, timeout=600)
    assert res["images"] + res["errors"] + res["duplicates"] == copied
    assert res["images"] > 30
    hits = _lake_hits(medray_home, lake, needles)
    assert not hits, sorted(hits)[:20]
    fs = h.s3fs(medray_home)
    manifest = json.loads(h.read_object(
        fs, f"{h.lake_base(lake)}/datasets/pydicom/1/manifest.json"))
    assert "internal_error" not in manifest["errors_by_type"], manifest["errors_by_type"]
