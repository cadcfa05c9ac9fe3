"""Shared pieces of the fault and security suites (``from tests.support import faults as h``).

- a tiny stage -> train -> score -> report round through the real CLI on the session's S3 lake,
  run once per pytest process and shared by both suites (its outputs are kept for the scans),
  and the hostile corpus of tests/support/data.py staged once;
- readers that check committed predictions with plain pyarrow, not with medray's own reader;
- finders for this session's Ray processes (never another Ray on the machine); every loop in
  these suites ends by count or by time.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tests.support.cli import run_cli
from tests.support.data import CORPUS_EXPECT as CORPUS_EXPECT  # the suites read both through h
from tests.support.data import PHI_TEXT as PHI_TEXT
from tests.support.data import build_corpus, small_npz
from tests.support.paths import MEDRAY
from tests.support.waiting import wait_for as wait_for  # the suites wait through h too

log = logging.getLogger(__name__)
LABELS = ["normal", "pneumonia"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# A shard target of ~50 kB of 28 px rows gives about ten shards: enough to stop a job between
# two committed shard files.
SHARD_MB = "0.05"


# ----------------------------------------------------------------------------- CLI
class CommandFailed(Exception):
    """A medray command that had to succeed exited non-zero. Not an AssertionError, so a test
    marked xfail(raises=AssertionError) never mistakes a broken fixture for its known bug."""


def cli(outputs: list[str] | None, *args: str, check: bool = True, env: dict | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    """run_cli that also keeps stdout and stderr (the security suite scans them)."""
    started = time.monotonic()
    proc = run_cli(*args, check=False, env=env, timeout=timeout)
    log.info("medray %s -> exit %d in %.1fs", " ".join(a for a in args[:4]), proc.returncode,
             time.monotonic() - started)
    if outputs is not None:
        outputs.extend([proc.stdout, proc.stderr])
    if check and proc.returncode != 0:
        raise CommandFailed(f"medray {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-6000:]}")
    return proc


def cli_json(outputs: list[str] | None, *args: str, **kw: Any) -> dict:
    proc = cli(outputs, *args, "--json", **kw)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the lake
def lake_config(home: Path) -> tuple[dict, dict]:
    cfg = json.loads((home / "lake" / "lake.json").read_text())
    creds = json.loads(Path(cfg["credentials_file"]).read_text())
    return cfg, creds


def s3fs(home: Path, **kwargs: Any) -> pafs.S3FileSystem:
    cfg, creds = lake_config(home)
    return pafs.S3FileSystem(access_key=creds["access_key"], secret_key=creds["secret_key"],
                             endpoint_override=cfg["endpoint"].split("//", 1)[1], scheme="http",
                             region="us-east-1", request_timeout=30, connect_timeout=5, **kwargs)


def lake_base(lake: str) -> str:
    assert lake.startswith("s3://"), lake
    return lake.removeprefix("s3://").rstrip("/")


def lake_files(fs: pafs.FileSystem, base: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


def read_object(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as fh:
        return fh.read()


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def committed(fs: pafs.FileSystem, lake: str, run_id: str) -> tuple[dict, pa.Table]:
    """(commit marker, prediction rows) of a committed run, read with plain pyarrow."""
    run_dir = f"{lake_base(lake)}/runs/{run_id}"
    marker = json.loads(read_object(fs, f"{run_dir}/_COMMITTED.json"))
    tables = [pq.read_table(f"{run_dir}/{f}", filesystem=fs) for f in marker["files"]]
    return marker, pa.concat_tables(tables) if tables else pa.table({})


def assert_same_predictions(got: pa.Table, ref: pa.Table, labels: list[str] = LABELS) -> None:
    """Same image ids, each once, and the same scores (to 1e-6) as the clean run."""
    ids = got.column("image_id").to_pylist()
    ref_ids = ref.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicated prediction rows"
    assert len(ref_ids) == len(set(ref_ids))
    missing, extra = set(ref_ids) - set(ids), set(ids) - set(ref_ids)
    assert not missing and not extra, f"{len(missing)} images missing, {len(extra)} unexpected"
    got_s = got.sort_by("image_id")
    ref_s = ref.sort_by("image_id")
    for label in labels:
        np.testing.assert_allclose(got_s.column(f"score_{label}").to_numpy(),
                                   ref_s.column(f"score_{label}").to_numpy(), rtol=0, atol=1e-6)
    assert got_s.column("predicted_labels").to_pylist() == \
        ref_s.column("predicted_labels").to_pylist()


# ----------------------------------------------------------------------------- the cluster
def ray_state(home: Path) -> tuple[dict, str]:
    cfg = json.loads((home / "ray" / "cluster.json").read_text())
    return cfg, (home / "ray" / "auth_token").read_text().strip()


def job_status(home: Path, job_id: str) -> str:
    """A job's status straight from the Jobs REST API (no Ray client in the test process)."""
    cfg, token = ray_state(home)
    req = urllib.request.Request(f"{cfg['dashboard_url']}/api/jobs/{job_id}",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.loads(resp.read())["status"])


def wait_job(home: Path, job_id: str, timeout: float) -> str:
    def ended() -> str | None:
        status = job_status(home, job_id)
        return status if status in TERMINAL else None

    return str(wait_for(f"job {job_id} to end", ended, timeout, every=1.0))


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """Every process of the cluster whose Ray temp dir is ``temp_dir``, with descendants
    (workers retitle themselves ``ray::...`` and lose the temp dir from their cmdline)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def find(temp_dir: str, needle: str) -> list[psutil.Process]:
    return [p for p in cluster_processes(temp_dir) if needle in cmdline(p)]


def job_drivers(temp_dir: str, kind: str) -> list[tuple[psutil.Process, dict]]:
    """(process, decoded spec) of the ``python -m medray.jobs.entry KIND`` drivers running."""
    out = []
    for proc in find(temp_dir, "medray.jobs.entry"):
        try:
            args = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "-m" not in args or kind not in args or "--spec" not in args:
            continue
        spec = json.loads(base64.urlsafe_b64decode(args[args.index("--spec") + 1]))
        out.append((proc, spec))
    return out


def sigkill(procs: list[psutil.Process]) -> list[int]:
    killed = []
    for proc in procs:
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return killed


# ----------------------------------------------------------------------------- the pipeline
@dataclass
class Pipeline:
    """One stage -> train -> score -> report round through the CLI, and what it printed."""

    lake: str
    src: Path
    staged: dict
    trained: dict
    scored: dict
    reported: dict
    outputs: list[str] = field(default_factory=list)

    @property
    def job_ids(self) -> list[str]:
        return [d["job_id"] for d in (self.staged, self.trained, self.scored, self.reported)]


_PIPELINES: dict[str, Pipeline] = {}


def shared_pipeline(bucket: str, workdir: Path) -> Pipeline:
    """Run the round once per pytest process (both suites use it) on tiny 28 px images."""
    if bucket in _PIPELINES:
        return _PIPELINES[bucket]
    lake = f"s3://{bucket}/rel-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True, exist_ok=True)
    src = small_npz(workdir / "tiny.npz", {"train": 120, "val": 40, "test": 240}, seed=3)
    out: list[str] = []
    staged = cli_json(out, "stage", str(src), "--dataset", "pneu", "--image-size", "28",
                      "--label-names", ",".join(LABELS), "--shard-mb", SHARD_MB, "--lake", lake)
    trained = cli_json(out, "train", "--dataset", "pneu", "--model", "cnn", "--epochs", "1",
                       "--batch-size", "32", "--lake", lake)
    scored = cli_json(out, "score", "--dataset", "pneu", "--model", "cnn:1", "--split", "test",
                      "--lake", lake)
    reported = cli_json(out, "report", scored["run_id"], "--n-boot", "20", "--lake", lake)
    pipe = Pipeline(lake, src, staged, trained, scored, reported, out)
    _PIPELINES[bucket] = pipe
    return pipe


def build_slow_model(path: Path, layers: int = 6, width: int = 128) -> Path:
    """A plain Keras CNN (standard layers only) slow enough on CPU (~25 ms per 28 px image)
    that a score job is still running when a fault is injected; registered like any
    bring-your-own model."""
    import keras

    keras.utils.set_random_seed(11)
    inputs = keras.Input((28, 28, 1), name="pixels")
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    for i in range(layers):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"c{i}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(LABELS), activation="softmax")(x)
    keras.Model(inputs, outputs).save(path)
    return path


def medray_bin() -> str:
    return MEDRAY


@dataclass
class CorpusStage:
    """The hostile corpus staged once (folder source, originals kept), with the peak memory of
    the cluster's processes while it ran."""

    lake: str
    paths: dict[str, Path]
    manifest: dict
    shards: pa.Table
    errors: pa.Table
    peak_rss: dict[str, int]
    status: str
    outputs: list[str]


_CORPUS: dict[str, CorpusStage] = {}


def shared_corpus_stage(bucket: str, workdir: Path, home: Path, temp_dir: str) -> CorpusStage:
    if bucket in _CORPUS:
        return _CORPUS[bucket]
    lake = f"s3://{bucket}/corpus-{uuid.uuid4().hex[:8]}"
    paths = build_corpus(workdir / "corpus")
    out: list[str] = []
    res = cli_json(out, "stage", str(workdir / "corpus"), "--dataset", "corpus", "--image-size",
                   "28", "--max-errors", "100%", "--keep-original",
                   "--lake", lake, "--no-wait")
    job_id = str(res["job_id"])
    peak: dict[str, int] = {}
    deadline = time.monotonic() + 400
    status = "PENDING"
    while time.monotonic() < deadline:  # sample every process of the cluster while it runs
        for proc in cluster_processes(temp_dir):
            try:
                key = f"{proc.pid} {proc.name()}"
                peak[key] = max(peak.get(key, 0), proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        status = job_status(home, job_id)
        if status in TERMINAL:
            break
        time.sleep(0.2)
    out.append(cli(None, "jobs", "logs", job_id).stdout)
    fs = s3fs(home)
    base = lake_base(lake)
    manifest: dict = {}
    shards = errors = pa.table({})
    if status == "SUCCEEDED":
        manifest = json.loads(read_object(fs, f"{base}/datasets/corpus/1/manifest.json"))
        shards = pa.concat_tables([pq.read_table(f"{base}/{s['path']}", filesystem=fs)
                                   for s in manifest["shards"]])
        errors = pa.concat_tables([pq.read_table(f"{base}/{p}", filesystem=fs)
                                   for p in manifest["error_files"]])
    stage = CorpusStage(lake, paths, manifest, shards, errors, peak, status, out)
    _CORPUS[bucket] = stage
    return stage
