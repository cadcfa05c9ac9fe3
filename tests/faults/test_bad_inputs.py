"""A generated corpus of broken and hostile inputs, staged through the real CLI: every item is
either staged or gets an errors-table row with a machine-readable kind; nothing crashes or
hangs (subprocess timeouts); memory stays bounded (peak RSS of the cluster's processes, with a
DICOM whose JPEG frame declares 3.6 gigapixels among them, and an .npz bomb); a manifest cannot
make the job read outside its images root; bad YAML specs exit 2."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from medray.workers.imaging import IMAGE_ERROR_KINDS
from tests.support import faults as h
from tests.support.data import npz_bomb

# A staging process that decoded one of the bombs (1.6 to 3.6 gigapixels declared, 144
# megapixels real) would pass this; Ray workers that only decode 28 px images stay far below.
RSS_BOUND = 1536 * 1024 * 1024
log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def corpus(s3_server, medray_home, ray_cluster, tmp_path_factory) -> h.CorpusStage:
    return h.shared_corpus_stage(s3_server["bucket"], tmp_path_factory.mktemp("corpus"),
                                 medray_home, ray_cluster["temp_dir"])


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


@pytest.mark.integration
def test_every_corpus_item_is_staged_or_has_an_error_row(corpus):
    assert corpus.status == "SUCCEEDED", "\n".join(corpus.outputs)[-3000:]
    # DICOM rows name their file by a pseudonym (docs/deid.md): known here by their bytes
    names = {hashlib.sha256(p.read_bytes()).hexdigest(): n for n, p in corpus.paths.items()}

    def name(row: dict) -> str:
        return names.get(row["image_id"] or "", _name(row["source_uri"]))

    staged = [name(r) for r in corpus.shards.select(["image_id", "source_uri"]).to_pylist()]
    failed = {name(r): r for r in corpus.errors.to_pylist()}
    assert len(staged) == len(set(staged))
    assert not set(staged) & set(failed), "an item is both staged and failed"
    assert set(staged) | set(failed) == set(h.CORPUS_EXPECT), "an item vanished"
    for name, kinds in h.CORPUS_EXPECT.items():
        if kinds is None:
            assert name in staged, f"{name} should be staged: {failed.get(name)}"
        else:
            row = failed.get(name)
            assert row is not None, f"{name} was staged but should have failed"
            assert row["error_type"] in kinds, (name, row)
            assert row["error_type"] in IMAGE_ERROR_KINDS
            assert row["message"] and row["stage"] == "decode"
            # the error row names the bytes it refers to (image_id = SHA-256 of the file)
            digest = hashlib.sha256(corpus.paths[name].read_bytes()).hexdigest()
            assert row["image_id"] in (digest, None), name
    assert corpus.manifest["errors"] == len(failed)
    shapes = set(zip(*(corpus.shards.column(c).to_pylist()
                       for c in ("height", "width", "channels")), strict=True))
    assert shapes == {(28, 28, 1)}
    assert all(len(p) == 28 * 28 for p in corpus.shards.column("pixels").to_pylist())


@pytest.mark.integration
def test_staging_memory_stays_bounded(corpus):
    assert corpus.peak_rss, "no process of the cluster was sampled"
    worst = max(corpus.peak_rss, key=corpus.peak_rss.__getitem__)
    top = sorted(corpus.peak_rss.items(), key=lambda kv: -kv[1])[:3]
    log.info("peak RSS while staging the corpus: %s",
             ", ".join(f"{k}: {v / 2**20:.0f} MiB" for k, v in top))
    assert corpus.peak_rss[worst] < RSS_BOUND, (
        f"{worst} peaked at {corpus.peak_rss[worst] / 2**20:.0f} MiB while staging the corpus")


def _stage(lake: str, source: Path, *args: str, timeout: float = 400) -> tuple[int, dict, str]:
    proc = h.cli(None, "stage", str(source), "--image-size", "28", "--max-errors", "100%",
                 "--lake", lake, "--json", *args, check=False, timeout=timeout)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "{}"
    return proc.returncode, json.loads(last) if last.startswith("{") else {}, proc.stderr


def _dataset_tables(home: Path, lake: str, name: str) -> tuple[dict, list[dict], list[dict]]:
    import pyarrow.parquet as pq

    fs = h.s3fs(home)
    base = h.lake_base(lake)
    manifest = json.loads(h.read_object(fs, f"{base}/datasets/{name}/1/manifest.json"))
    rows = [r for s in manifest["shards"]
            for r in pq.read_table(f"{base}/{s['path']}", filesystem=fs,
                                   columns=["image_id", "source_uri"]).to_pylist()]
    errors = [r for p in manifest["error_files"]
              for r in pq.read_table(f"{base}/{p}", filesystem=fs).to_pylist()]
    return manifest, rows, errors


@pytest.mark.integration
def test_csv_manifest_cannot_leave_the_images_root(tmp_path, s3_lake, medray_home, ray_cluster):
    from PIL import Image

    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    rng = np.random.default_rng(1)
    for path in (root / "imgs" / "ok.png", root / "imgs" / "ok2.png", outside / "secret.png"):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
    secret_id = hashlib.sha256((outside / "secret.png").read_bytes()).hexdigest()
    rows = {
        "imgs/ok.png": "ok",
        "imgs/./ok2.png": "ok",
        "imgs/missing.png": "missing",
        "../../etc/passwd": "unsafe_path",
        "/etc/passwd": "unsafe_path",
        str(outside / "secret.png"): "unsafe_path",
        "imgs/../../outside/secret.png": "unsafe_path",
        "": "unsafe_path",
    }
    lines = ["Image Index,Finding Labels,Patient ID"]
    lines += [f"{path},{'Effusion' if i % 2 else 'No Finding'},p{i}"
              for i, path in enumerate(rows)]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    code, res, err = _stage(s3_lake, root / "manifest.csv", "--dataset", "csvhostile")
    assert code == 0, err[-3000:]
    manifest, staged, errors = _dataset_tables(medray_home, s3_lake, "csvhostile")
    assert sorted(_name(r["source_uri"]) for r in staged) == ["ok.png", "ok2.png"]
    assert secret_id not in {r["image_id"] for r in staged}
    assert not any("outside" in r["source_uri"] or "passwd" in r["source_uri"] for r in staged)
    kinds = sorted(r["error_type"] for r in errors)
    assert kinds == sorted(k for k in rows.values() if k != "ok"), errors
    assert "imgs/missing.png" in next(r["message"] for r in errors if r["error_type"] == "missing")
    for r in errors:
        assert r["message"], r
        # nothing read outside the root: no error row carries the outside file's bytes hash
        assert r["image_id"] in (None, "") or r["image_id"] != secret_id
    assert res.get("errors") == len(errors) == manifest["errors"]


@pytest.mark.integration
def test_npz_with_nan_and_wrong_shape_images_gets_error_rows(tmp_path, s3_lake, medray_home,
                                                            ray_cluster):
    rng = np.random.default_rng(2)
    good = rng.random((6, 28, 28)).astype(np.float32)
    nan = good.copy()
    nan[:2, 3, 3] = np.nan  # two images carry a NaN pixel
    np.savez(tmp_path / "bad.npz",
             train_images=nan, train_labels=np.array([0, 1, 0, 1, 0, 1]),
             val_images=rng.random((3, 28, 28, 7)).astype(np.float32),  # 7 channels
             val_labels=np.array([0, 1, 0]),
             test_images=good[:2], test_labels=np.array([0, 1]))
    code, res, err = _stage(s3_lake, tmp_path / "bad.npz", "--dataset", "npzbad",
                            "--label-names", "a,b")
    assert code == 0, err[-3000:]
    manifest, staged, errors = _dataset_tables(medray_home, s3_lake, "npzbad")

    def item(uri: str) -> str:  # '.../bad.npz#train_images/0' (or '#train/0') -> 'train/0'
        return uri.rsplit("#", 1)[1].replace("_images", "")

    by_item = {item(r["source_uri"]): r["error_type"] for r in errors}
    assert by_item == {"train/0": "invalid", "train/1": "invalid", "val/0": "invalid",
                       "val/1": "invalid", "val/2": "invalid"}, errors
    assert all(r["message"] for r in errors)
    assert sorted(item(r["source_uri"]) for r in staged) == [
        "test/0", "test/1", "train/2", "train/3", "train/4", "train/5"]
    assert res.get("errors") == 5 == manifest["errors"]


@pytest.mark.integration
def test_an_npz_bomb_is_an_errors_row_in_bounded_memory_and_the_job_ends(
        tmp_path, s3_lake, medray_home, ray_cluster):
    bomb = npz_bomb(tmp_path / "bomb.npz", side=20_000)  # 400 MB of zeros in 400 kB
    res = h.cli_json(None, "stage", str(bomb), "--dataset", "npzbomb", "--image-size", "28",
                     "--max-pixels", "1000000", "--max-errors", "1", "--lake", s3_lake,
                     "--no-wait")
    peak, status = _sample_while_running(medray_home, ray_cluster["temp_dir"], res["job_id"])
    assert status == "SUCCEEDED"
    assert max(peak.values()) < RSS_BOUND, sorted(peak.items(), key=lambda kv: -kv[1])[:3]
    manifest, staged, errors = _dataset_tables(medray_home, s3_lake, "npzbomb")
    assert len(staged) == 4 and manifest["errors_by_type"] == {"too_large": 1}
    assert [_name(r["source_uri"]).rsplit("#", 1)[1] for r in errors] == ["train_images"]


def _sample_while_running(home: Path, temp_dir: str, job_id: str,
                          timeout: float = 400) -> tuple[dict[str, int], str]:
    """(peak RSS of every cluster process, final status) of a job, sampled until it ends."""
    peak: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    status = "PENDING"
    while time.monotonic() < deadline and status not in h.TERMINAL:
        for proc in h.cluster_processes(temp_dir):
            try:
                key = f"{proc.pid} {proc.name()}"
                peak[key] = max(peak.get(key, 0), proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        status = h.job_status(home, job_id)
        time.sleep(0.2)
    return peak, status


@pytest.mark.integration
def test_npz_with_nan_labels_gets_an_error_row(tmp_path, s3_lake, medray_home, ray_cluster):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "nanlabels.npz", train_images=rng.integers(0, 255, (4, 28, 28), np.uint8),
             train_labels=np.array([0.0, np.nan, 1.0, 0.0]))
    code, _, err = _stage(s3_lake, tmp_path / "nanlabels.npz", "--dataset", "npznan")
    assert code == 0, err[-2000:]
    _, staged, errors = _dataset_tables(medray_home, s3_lake, "npznan")
    assert [(r["source_uri"].rsplit("/", 1)[1], r["error_type"]) for r in errors] == [
        ("1", "bad_label")], errors
    assert "label" in errors[0]["message"].lower()
    assert len(staged) == 3


# ----------------------------------------------------------------------------- specs
_LOLS = ['&x0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
_LOLS += [f"&x{i} [" + ",".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, 10)]
BOMB = "[" + ", ".join(_LOLS) + "]"  # "billion laughs": 9**10 strings if expanded
SPECS = {
    "invalid_yaml": ("kind: score\ndataset: [unclosed\n", "not valid YAML"),
    "unknown_key": ("kind: score\ndataset: d\nmodel: m\nbach_size: 3\n",
                    "did you mean 'batch_size'"),
    "unknown_kind": ("kind: scor\ndataset: d\n", "did you mean 'score'"),
    "wrong_type": ("kind: train\ndataset: d\nmodel: m\nepochs: many\n", "epochs"),
    "missing_kind": ("dataset: d\nmodel: m\n", "no 'kind'"),
    "not_a_mapping": ("- kind: score\n", "mapping"),
    "bad_name": ("kind: train\ndataset: d\nmodel: ../../etc\n", "model name"),
    "billion_laughs": (f"kind: stage\nsource: /tmp\ndataset: d\nlabel_names: {BOMB}\n",
                       "label_names"),
    "python_object": ("kind: score\ndataset: !!python/object/apply:os.system "
                      "['touch {marker}']\nmodel: m\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(SPECS))
def test_bad_spec_file_exits_2_with_a_clear_message(case, tmp_path):
    text, expected = SPECS[case]
    marker = tmp_path / "pwned"
    spec = tmp_path / f"{case}.yaml"
    spec.write_text(text.replace("{marker}", str(marker)))
    started = time.monotonic()
    proc = subprocess.run([h.medray_bin(), "submit", str(spec), "--lake", str(tmp_path / "lake")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 30
    assert not marker.exists(), "YAML ran code"


def test_non_utf8_spec_file_exits_2(tmp_path):
    spec = tmp_path / "binary.yaml"
    spec.write_bytes(b"kind: score\ndataset: \xff\xfe\x00\x81\n")
    proc = subprocess.run([h.medray_bin(), "submit", str(spec), "--lake", str(tmp_path / "lake")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "not UTF-8" in proc.stderr
