"""Batch scoring on a real local Ray cluster and real lakes (a folder and the embedded S3):
stop-and-resume is exactly once, --only-new scores only new images, failed images land in the
errors table, GPU requests reach the actors, committed run ids are refused.

Prediction tables are read back with plain pyarrow from the files the commit marker lists."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.support.cli import cli_json, run_cli
from tests.support.data import small_npz
from tests.support.paths import MEDRAY
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration]
LABELS = ["normal", "pneumonia"]
SIZE = 28


# ------------------------------------------------------------------ helpers
def _lake(uri: str):
    from medray.cluster.store.lake import Lake

    return Lake(uri)


def _register(lake_uri: str, name: str, model, tmp: Path) -> int:
    from medray.cluster.store import registry
    from medray.workers.models import ModelCard

    path = tmp / f"{name}.keras"
    model.save(path)
    card = ModelCard(name=name, labels=LABELS, multi_label=False, input_size=SIZE, channels=1,
                     arch="test", source="built by the test, untrained")
    return int(registry.register(_lake(lake_uri), str(path), card).version or 0)


def _slow_model():
    """Plain Keras layers, ~25 ms per 28 px image on one core: a run lasts seconds, so a
    stop lands between two shard files."""
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((SIZE, SIZE, 1), name="pixels")
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    for i in range(6):
        x = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name=f"c{i}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax", name="scores")(x)
    return keras.Model(inputs, outputs)


def _fs_and_base(lake_uri: str, medray_home: Path) -> tuple[pafs.FileSystem, str]:
    if not lake_uri.startswith("s3://"):
        return pafs.LocalFileSystem(), str(Path(lake_uri).resolve())
    cfg = json.loads((medray_home / "lake" / "lake.json").read_text())
    creds = json.loads(Path(cfg["credentials_file"]).read_text())
    fs = pafs.S3FileSystem(access_key=creds["access_key"], secret_key=creds["secret_key"],
                           endpoint_override=cfg["endpoint"].split("//", 1)[1], scheme="http",
                           region="us-east-1")
    return fs, lake_uri.removeprefix("s3://").rstrip("/")


def _read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read())


def committed(lake_uri: str, run_id: str, home: Path) -> tuple[dict, pa.Table, pa.Table]:
    """(marker, predictions, errors) of a committed run, with plain pyarrow."""
    fs, base = _fs_and_base(lake_uri, home)
    run_dir = f"{base}/runs/{run_id}"
    marker = _read_json(fs, f"{run_dir}/_COMMITTED.json")
    assert marker is not None, f"run {run_id} is not committed"
    preds = [pq.read_table(f"{run_dir}/{f}", filesystem=fs) for f in marker["files"]]
    errors = [pq.read_table(f"{run_dir}/{f}", filesystem=fs) for f in marker["error_files"]]
    empty = pa.table({"image_id": pa.array([], pa.string())})
    return marker, pa.concat_tables(preds), pa.concat_tables(errors) if errors else empty


def prediction_files(lake_uri: str, run_id: str, home: Path) -> list[str]:
    fs, base = _fs_and_base(lake_uri, home)
    sel = pafs.FileSelector(f"{base}/runs/{run_id}/predictions", recursive=True,
                            allow_not_found=True)
    return sorted(i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File
                  and not i.base_name.startswith("."))


def dataset_ids(lake_uri: str, dataset: str, version: int) -> set[str]:
    lake = _lake(lake_uri)
    manifest = lake.read_json(f"datasets/{dataset}/{version}/manifest.json")
    return {i for s in manifest["shards"]
            for i in lake.read_parquet(s["path"], columns=["image_id"]).column(0).to_pylist()}


# ------------------------------------------------------------------ one dataset, two models
@pytest.fixture(scope="module")
def setup(ray_cluster, tmp_path_factory) -> dict:
    from medray.workers.models import build_model

    tmp = tmp_path_factory.mktemp("scoring")
    lake = str(tmp / "lake")
    src = small_npz(tmp / "cxr.npz", {"test": 320}, seed=1)
    staged = cli_json("stage", str(src), "--dataset", "cxr", "--image-size", str(SIZE),
                      "--label-names", ",".join(LABELS), "--shard-mb", "0.05", "--lake", lake)
    assert staged["shards"] >= 4, staged
    tiny = _register(lake, "tiny", build_model("small_cnn", SIZE, 1, 2, False, seed=0), tmp)
    slow = _register(lake, "slow", _slow_model(), tmp)
    return {"lake": lake, "tmp": tmp, "staged": staged, "tiny": f"tiny:{tiny}",
            "slow": f"slow:{slow}", "ids": dataset_ids(lake, "cxr", staged["version"])}


def _score(setup: dict, model: str, run_id: str, *extra: str) -> list[str]:
    return ["score", "--dataset", "cxr", "--model", model, "--run-id", run_id,
            "--lake", setup["lake"], *extra]


# ------------------------------------------------------------------ (a) stop and resume
def test_stop_and_resume_gives_exactly_the_uninterrupted_rows(setup, medray_home):
    lake, tag = setup["lake"], uuid.uuid4().hex[:6]
    part, full = f"part-{tag}", f"full-{tag}"
    # half a CPU each: the uninterrupted run goes on beside the one that is stopped, so this
    # also shows two runs over one dataset at once both committing
    opts = ("--batch-size", "8", "--cpus-per-actor", "0.5")
    # the run to stop also waits 0.25 s after each batch of 8: the job writes its prediction
    # files in bursts, and the slow model alone left the stop racing the last burst
    slowed = {**os.environ, "MEDRAY_FAULT": "score_batch_delay:0.25"}
    job = cli_json(*_score(setup, setup["slow"], part, *opts), "--no-wait",
                   env=slowed)["job_id"]
    reference = subprocess.Popen([MEDRAY, *_score(setup, setup["slow"], full, *opts), "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def first_file() -> list[str]:
            fs, base = _fs_and_base(lake, medray_home)
            assert _read_json(fs, f"{base}/runs/{part}/_COMMITTED.json") is None, \
                "the run committed before it could be stopped: the model is too fast"
            return prediction_files(lake, part, medray_home)

        wait_for(f"a first prediction file of {part}", first_file, 240)
        run_cli("jobs", "stop", job)
        status = wait_for("the stopped job to end", lambda: (s := run_cli(
            "jobs", "status", job).stdout.strip()) in ("STOPPED", "FAILED", "SUCCEEDED") and s,
            120, every=0.5)
        out, err = reference.communicate(timeout=600)
    finally:
        if reference.poll() is None:
            reference.kill()
    assert status == "STOPPED", status
    assert reference.returncode == 0, err[-3000:]
    written = prediction_files(lake, part, medray_home)
    assert 1 <= len(written) < setup["staged"]["shards"], written
    fs, base = _fs_and_base(lake, medray_home)
    assert _read_json(fs, f"{base}/runs/{part}/_COMMITTED.json") is None

    proc = run_cli(*_score(setup, setup["slow"], part, *opts), "--json", "--verbose")
    resumed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f"resuming run {part}" in proc.stderr
    assert resumed["resumed_shards"] == len(written)
    # the files written before the stop are kept as they were, not rewritten
    assert set(written) <= set(prediction_files(lake, part, medray_home))

    _, got, got_err = committed(lake, part, medray_home)
    _, ref, _ = committed(lake, full, medray_home)
    ids = got.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), "an image was scored twice"
    assert set(ids) == set(ref.column("image_id").to_pylist()) == setup["ids"]
    assert got_err.num_rows == 0
    got, ref = got.sort_by("image_id"), ref.sort_by("image_id")
    for label in LABELS:
        np.testing.assert_allclose(got.column(f"score_{label}").to_numpy(),
                                   ref.column(f"score_{label}").to_numpy(), rtol=0, atol=1e-6)
    assert got.column("predicted_labels").to_pylist() == ref.column("predicted_labels").to_pylist()
    setup["committed_run"] = full


# ------------------------------------------------------------------ (e) committed id refused
def test_a_committed_run_id_is_refused(setup, medray_home):
    run_id = setup.get("committed_run")
    if run_id is None:  # run alone: commit one first
        run_id = f"done-{uuid.uuid4().hex[:6]}"
        run_cli(*_score(setup, setup["tiny"], run_id))
    fs, base = _fs_and_base(setup["lake"], medray_home)
    before = _read_json(fs, f"{base}/runs/{run_id}/_COMMITTED.json")
    proc = run_cli(*_score(setup, setup["tiny"], run_id), check=False)
    assert f"run {run_id!r} is already committed" in proc.stderr, proc.stderr[-2000:]
    assert _read_json(fs, f"{base}/runs/{run_id}/_COMMITTED.json") == before
    assert proc.returncode == 2  # refused before submission


def test_precheck_refuses_a_resume_with_other_options_and_gpus_the_cluster_lacks(
        setup, monkeypatch):
    """The checks `medray score` makes before submitting, called directly (no job)."""
    from medray.cluster.infra import ray_local
    from medray.cluster.infra.context import JobContext
    from medray.cluster.score import job
    from medray.cluster.score.precheck import precheck
    from medray.workers.errors import InputError
    from medray.workers.specs import ScoreSpec, build_spec

    for key, value in ray_local.auth_env().items():  # restored after the test
        monkeypatch.setenv(key, value)
    lake = _lake(setup["lake"])
    run_id = f"opts-{uuid.uuid4().hex[:6]}"

    def spec(**values) -> ScoreSpec:
        built = build_spec("score", {"dataset": "cxr", "model": setup["tiny"], "run_id": run_id,
                                     "lake": setup["lake"], **values})
        assert isinstance(built, ScoreSpec)
        return built

    ctx = JobContext(job_id="job-precheck", kind="score", submitted_by="test", submitted_at=None)
    job.start_run(lake, spec(), ctx, run_id)  # what a first attempt writes
    precheck(spec(batch_size=64, actors=2), lake, None)  # speed options may change
    with pytest.raises(InputError, match="started with split=None, not 'test'"):
        precheck(spec(split="test"), lake, None)
    with pytest.raises(InputError, match="started with only_new=False"):
        precheck(spec(only_new=True), lake, None)
    from medray.workers.models import build_model

    other = _register(setup["lake"], "tiny", build_model("small_cnn", SIZE, 1, 2, False, seed=5),
                      setup["tmp"])
    with pytest.raises(InputError, match=f"scores model version 1, not {other}"):
        precheck(spec(model=f"tiny:{other}"), lake, None)
    precheck(spec(gpus_per_actor=1, allow_cpu=True), lake, None)  # no cluster question
    # GPUs the cluster lacks: test_gpus_on_a_cluster_without_gpus_fail_with_a_clear_message


# ------------------------------------------------------------------ (b) only new, on S3
def test_only_new_scores_only_the_images_added_since(s3_lake, medray_home, tmp_path):
    from medray.workers.models import build_model

    src = small_npz(tmp_path / "grow.npz", {"test": 60}, seed=2)
    stage = ("stage", str(src), "--dataset", "grow", "--image-size", str(SIZE), "--label-names",
             ",".join(LABELS), "--lake", s3_lake)
    v1 = cli_json(*stage)
    version = _register(s3_lake, "tiny", build_model("small_cnn", SIZE, 1, 2, False), tmp_path)
    model = f"tiny:{version}"
    score = ("score", "--dataset", "grow", "--model", model, "--only-new", "--lake", s3_lake)
    first = cli_json(*score)
    old = dataset_ids(s3_lake, "grow", v1["version"])
    assert first["images"] == len(old)

    more = np.load(small_npz(tmp_path / "more.npz", {"test": 40}, seed=9))
    old_arrays = dict(np.load(src))
    np.savez(src, test_images=np.concatenate([old_arrays["test_images"], more["test_images"]]),
             test_labels=np.concatenate([old_arrays["test_labels"], more["test_labels"]]))
    v2 = cli_json(*stage)
    new = dataset_ids(s3_lake, "grow", v2["version"]) - old
    assert len(new) >= 30 and old <= dataset_ids(s3_lake, "grow", v2["version"])

    second = cli_json(*score)
    marker, preds, _ = committed(s3_lake, second["run_id"], medray_home)
    ids = preds.column("image_id").to_pylist()
    assert sorted(ids) == sorted(new)
    assert marker["dataset_version"] == v2["version"]
    assert marker["only_new_runs"] == [first["run_id"]]


# ------------------------------------------------------------------ (c) a corrupted row
def _craft_version(lake_uri: str, name: str, source: str, version: int, row: int,
                   pixels: bytes | None) -> str:
    """Copy a staged dataset as ``name:version``, with row ``row`` of its first shard given
    ``pixels`` (None keeps them). Returns that row's image id."""
    lake = _lake(lake_uri)
    manifest = lake.read_json(f"datasets/{source}/1/manifest.json")
    shards = []
    bad_id = ""
    for i, shard in enumerate(manifest["shards"]):
        table = lake.read_parquet(shard["path"])
        if i == 0:
            bad_id = table.column("image_id")[row].as_py()
            if pixels is not None:
                col = table.column("pixels").to_pylist()
                col[row] = pixels
                table = table.set_column(table.schema.get_field_index("pixels"), "pixels",
                                         pa.array(col, pa.binary()))
        rel = f"datasets/{name}/{version}/shards/part-{i:05d}.parquet"
        size = lake.write_parquet(rel, table)
        shards.append({**shard, "path": rel, "rows": table.num_rows, "bytes": size,
                       "sha256": hashlib.sha256(lake.read_bytes(rel)).hexdigest()})
    lake.write_json(f"datasets/{name}/{version}/manifest.json",
                    {**manifest, "dataset": name, "version": version, "shards": shards})
    return bad_id


def test_a_corrupted_row_lands_in_errors_and_retry_failed_rescores_it(setup, medray_home):
    lake = setup["lake"]
    bad_id = _craft_version(lake, "cxrbad", "cxr", 1, row=3, pixels=b"\x00" * 100)
    first = cli_json("score", "--dataset", "cxrbad", "--model", setup["tiny"], "--lake", lake)
    assert first["errors"] == 1 and first["images"] == len(setup["ids"]) - 1
    _, preds, errors = committed(lake, first["run_id"], medray_home)
    assert errors.column("image_id").to_pylist() == [bad_id]
    assert errors.column("error_type").to_pylist() == ["bad_pixels"]
    assert "100 bytes" in errors.column("message")[0].as_py()
    assert bad_id not in set(preds.column("image_id").to_pylist())

    _craft_version(lake, "cxrbad", "cxr", 2, row=3, pixels=None)  # the image fixed upstream
    retry = cli_json("score", "--dataset", "cxrbad", "--model", setup["tiny"], "--retry-failed",
                     first["run_id"], "--lake", lake)
    marker, preds, errors = committed(lake, retry["run_id"], medray_home)
    assert preds.column("image_id").to_pylist() == [bad_id]
    assert errors.num_rows == 0 and marker["retry_failed"] == first["run_id"]
    assert preds.column("score_normal")[0].as_py() is not None


# ------------------------------------------------------------------ (d) GPUs
def test_gpus_on_a_cluster_without_gpus_fail_with_a_clear_message(setup):
    run_id = f"gpu-{uuid.uuid4().hex[:6]}"
    proc = run_cli(*_score(setup, setup["tiny"], run_id, "--gpus-per-actor", "1"), check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]  # refused before submission
    assert "--gpus-per-actor 1 but the cluster has 0 GPU(s)" in proc.stderr, proc.stderr[-2000:]
    assert "--allow-cpu" in proc.stderr
    assert not _lake(setup["lake"]).exists(f"runs/{run_id}/run.json")


def test_allow_cpu_scores_on_cpu_partitioned_by_date(setup, medray_home):
    import duckdb

    run_id = f"cpu-{uuid.uuid4().hex[:6]}"
    proc = run_cli(*_score(setup, setup["tiny"], run_id, "--gpus-per-actor", "1", "--allow-cpu",
                           "--mixed-precision", "--partition-by", "date"), "--json")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "scoring on CPUs (--allow-cpu)" in proc.stderr
    assert res["device"] == "cpu" and res["images"] == len(setup["ids"])
    marker, preds, _ = committed(setup["lake"], run_id, medray_home)
    day = marker["partition_date"]
    assert date.fromisoformat(day)
    assert all(f.startswith(f"predictions/date={day}/") for f in marker["files"])
    assert {a["precision"] for a in marker["actors"]} == {"float32"}  # no GPU: no float16
    assert all(a["ray_gpu_ids"] == [] for a in marker["actors"])
    # the docs' DuckDB query over the partitioned folder sees the same rows and the date
    run_dir = Path(setup["lake"]) / "runs" / run_id
    query = (f"SELECT count(*), count(DISTINCT image_id), min(date) FROM read_parquet("
             f"'{run_dir}/predictions/*/*.parquet', hive_partitioning = true)")
    rows = duckdb.sql(query).fetchall()[0]
    assert rows[0] == rows[1] == preds.num_rows and str(rows[2]) == day


_FAKE_GPU = r"""
import json, logging, shutil, sys, uuid
import ray
temp = f"/tmp/mr-gpu-{uuid.uuid4().hex[:6]}"
# a separate one-node Ray that claims one GPU; this machine has none, so TensorFlow in the
# actor falls back to its CPU while Ray still hands the actor GPU 0
try:
    for attempt in range(3):  # Ray gives a new node 30 s to register: short on a busy box
        try:
            ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
                     _temp_dir=temp, logging_level=logging.WARNING)
            break
        except Exception as exc:
            print(f"ray.init attempt {attempt + 1} failed: {exc}", file=sys.stderr, flush=True)
            ray.shutdown()
            if attempt == 2:
                raise
    ray.data.DataContext.get_current().enable_progress_bars = False
    from medray.cluster.infra.context import JobContext
    from medray.cluster.score import job
    from medray.cluster.store.lake import Lake
    from medray.workers.specs import build_spec

    spec = build_spec("score", json.loads(sys.argv[1]))
    ctx = JobContext(job_id="fake-gpu-test", kind="score", submitted_by="test",
                     submitted_at=None)
    result = job.run(spec, Lake(spec.lake), ctx)
    print("RESULT " + json.dumps(result), flush=True)
finally:
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)
"""


def test_the_gpu_request_reaches_the_scorer_actors(setup, medray_home, tmp_path):
    run_id = f"fakegpu-{uuid.uuid4().hex[:6]}"
    values = {"dataset": "cxr", "model": setup["tiny"], "gpus_per_actor": 1, "run_id": run_id,
              "lake": setup["lake"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["MEDRAY_HOME"] = str(tmp_path / "home")  # nothing of the session's cluster is used
    proc = subprocess.run([sys.executable, "-c", _FAKE_GPU, json.dumps(values)], env=env,
                          capture_output=True, text=True, timeout=400, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["device"] == "gpu" and result["images"] == len(setup["ids"])
    marker, _, _ = committed(setup["lake"], run_id, medray_home)
    assert marker["gpus_per_actor"] == 1
    assert marker["actors"] and all(a["ray_gpu_ids"] == ["0"] for a in marker["actors"])
    assert all(a["tensorflow_gpus"] == [] for a in marker["actors"])  # no real GPU here
