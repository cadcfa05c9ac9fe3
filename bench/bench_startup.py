"""Start-up benchmark: where the fixed seconds of a small `medray score` job and of a small
`medray train` job go. The figures go into BENCHMARKS.md under "## Start-up".

A local Ray cluster and a local-folder lake under a private MEDRAY_HOME; PneumoniaMNIST staged at
28 px; a small CNN registered; then `medray score --split test --json` (624 images, default
flags) and `medray train --epochs 1` (small CNN, 4708 images, default flags) run a few times.
Each phase comes from a timestamp the job leaves behind:

- CLI and submission: the CLI process starts -> the job record's ``submitted_at``;
- job driver start: ``submitted_at`` -> ``started_at`` (Ray's job supervisor, the entrypoint's
  Python and imports, ``ray.init``);
- score: run set-up (lake reads, lease, run.json, sizing) up to the driver's "scorer pool" line;
  then Ray Data's planning and Ray starting the scorer actor's process (up to the process's
  start time, which the actor records), the actor's Python, Ray worker and imports up to its
  ``__init__``, and inside it the TensorFlow import and the model load (timed by the actor);
  the first batch (the actor's "first batch" line), scoring the rest (the driver's "scored"
  line), the files and the commit ("committed run"), the usage accounting and job record (the
  record's ``ended_at``), and the driver's exit and the CLI's read-back;
- train: the default one-worker CPU training runs its loop in the job's driver
  (cluster/train/in_driver.py): the driver's set-up (dataset reads, plan, Ray Train's import,
  the worker's CPU held) up to its "the training loop runs" line, then the loop's TensorFlow
  import, strategy and model build up to rank 0's "training" line. (On Ray Train's workers,
  as before: the set-up up to the start of the first Ray Train process, seen in /proc while
  the job runs; Ray Train's controller and worker group start up to the train worker's
  process start; the worker's Python, imports, TensorFlow import, strategy and model build
  up to rank 0's "training" line.) Then the first epoch with its
  dataset reads and validation (the "epoch 1/1 done" line), the final model, card,
  registration and usage accounting (up to ``ended_at``), and the driver's exit and the CLI's
  read-back. TensorFlow's import alone, in a fresh Python, is measured
  apart to say how much of the worker's start it is.

    .venv/bin/python bench/bench_startup.py            # 3 score runs, 2 train runs
    .venv/bin/python bench/bench_startup.py --runs 1 --train-runs 1 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from benchlib import proc_table, process_started_at, write_section

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
MEDRAY = str(Path(sys.executable).parent / "medray")
LOG_TS = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \[job [^\]]*\] ([\w.]+): (.*)")
# the first words of the log lines the phases need; the first line of each kind counts
MARKS = {"scorer pool:": "pool", "scorer first batch": "first_batch", "scored ": "scored",
         "run ": "listed",
         "committed run": "committed", "training id": "train_id", "training ": "training",
         "the training loop runs": "loop",
         "epoch 1/": "epoch1", "registered ": "registered"}
# Ray names its worker processes after the actor they hold (``ray::RayTrainWorker...``)
TRAIN_PROCESS = re.compile(r"ray::\w*(Train|Controller)")
TRAIN_WORKER = "RayTrainWorker"


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([MEDRAY, *args], capture_output=True, text=True, env=env, check=False,
                          timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"medray {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _log_times(log: str) -> dict[str, float]:
    """First timestamp of each line the phases need, from the job's log."""
    found: dict[str, float] = {}
    for line in log.splitlines():
        m = LOG_TS.search(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        msg = m.group(3)
        for start, mark in MARKS.items():
            if msg.startswith(start) and (mark != "training" or "per epoch" in msg) and \
                    (mark != "epoch1" or " done:" in msg) and \
                    (mark != "listed" or " to score" in msg):
                found.setdefault(mark, when)
                break
    return found


class ProcessWatch:
    """Notes when each Ray process takes on a name while a job runs (a Ray worker is renamed
    after the actor it holds). A process started during the job counts from its OS start time;
    an idle Ray worker started before it (left by an earlier job) that is handed an actor
    counts from the first look that sees its new name."""

    def __init__(self, every_s: float = 0.1) -> None:
        self.every_s = every_s
        self.before = {pid: cmd for pid, (_, cmd, _) in proc_table().items()}
        self.names: dict[int, dict[str, float]] = {}  # pid -> name -> first seen
        self.started: dict[int, float] = {}  # OS start of the processes new in the job
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            now = time.time()
            for pid, (_, cmd, _) in proc_table().items():
                if pid in self.names:
                    self.names[pid].setdefault(cmd, now)
                elif pid not in self.before:
                    started = process_started_at(pid)
                    if started is not None:
                        self.started[pid] = started
                        self.names[pid] = {cmd: started}
                elif cmd != self.before[pid]:
                    self.names[pid] = {cmd: now}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def first(self, pattern: re.Pattern[str] | str) -> float:
        """When the first process whose name matches ``pattern`` started (a new process) or
        took that name (an idle worker reused)."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        times = []
        for pid, names in self.names.items():
            matched = [t for name, t in names.items() if rx.search(name)]
            if matched:
                times.append(self.started.get(pid, min(matched)))
        if not times:
            seen = sorted({name[:80] for names in self.names.values() for name in names})
            raise SystemExit(f"no process matching {rx.pattern} was seen among {seen}")
        return min(times)


def job_times(env: dict[str, str], lake: str, res: dict[str, object]) -> tuple[
        dict[str, float], dict[str, float], str]:
    record = json.loads(_cli(env, "jobs", "show", str(res["job_id"]), "--lake", lake,
                             "--json").stdout)
    log = _cli(env, "jobs", "logs", str(res["job_id"])).stdout
    return ({"submitted": _ts(record["submitted_at"]), "started": _ts(record["started_at"]),
             "ended": _ts(record["ended_at"])},
            _log_times(log), log)


def score_run(env: dict[str, str], lake: str, model: str) -> dict[str, float]:
    t_cli = time.time()
    proc = _cli(env, "score", "--dataset", "tiny", "--model", model, "--split", "test",
                "--lake", lake, "--json")
    t_end = time.time()
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    job, times, _ = job_times(env, lake, res)
    actors_dir = Path(lake) / "runs" / res["run_id"] / "actors"
    actor = min((json.loads(p.read_text()) for p in actors_dir.glob("*.json")),
                key=lambda a: a["started_at"])
    boot = actor["startup"]
    ready = _ts(actor["started_at"])
    process, init = boot["process_started_at"], boot["init_started_at"]
    phases = {
        "CLI and submission": job["submitted"] - t_cli,
        "job driver start (supervisor, Python, imports, ray.init)":
            job["started"] - job["submitted"],
        "run set-up (lake reads, lease, run.json, sizing, resume check)":
            times["listed"] - job["started"],
        "Ray Data planning, Ray starts the actor's process": process - times["listed"],
        "actor's Python, Ray worker, Ray Data and medray imports": init - process,
        "TensorFlow import (in the actor)": boot["tensorflow_import_s"],
        "model fetch and load (in the actor)": ready - init - boot["tensorflow_import_s"],
        "first batch, tracing included": times["first_batch"] - ready,
        "scoring the other images (624 in all)": times["scored"] - times["first_batch"],
        "prediction files, commit marker": times["committed"] - times["scored"],
        "usage accounting (Ray's state API), job record": job["ended"] - times["committed"],
        "driver's exit, job end, CLI read-back": t_end - job["ended"],
    }
    phases["total (CLI start to exit)"] = t_end - t_cli
    return phases


def train_run(env: dict[str, str], lake: str, name: str) -> dict[str, float]:
    watch = ProcessWatch()
    t_cli = time.time()
    try:
        proc = _cli(env, "train", "--dataset", "tiny", "--model", name, "--epochs", "1",
                    "--lake", lake, "--json")
    finally:
        watch.stop()
    t_end = time.time()
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    job, times, log = job_times(env, lake, res)
    phases = {
        "CLI and submission": job["submitted"] - t_cli,
        "job driver start (supervisor, Python, imports, ray.init)":
            job["started"] - job["submitted"]}
    if "runs in this job's driver" in log:  # one CPU worker: cluster/train/in_driver.py
        phases.update({
            "driver set-up (dataset reads, plan, Ray Train import, the worker's CPU held)":
                times["loop"] - job["started"],
            "the loop in the driver: TensorFlow import, strategy, model build":
                times["training"] - times["loop"]})
    else:
        first = watch.first(TRAIN_PROCESS)
        worker = watch.first(TRAIN_WORKER)
        phases.update({
            "driver set-up (dataset reads, validation split, plan, Ray Train import)":
                first - job["started"],
            "Ray Train controller and worker group start": worker - first,
            "train worker: Python, imports, TensorFlow import, strategy, model build":
                times["training"] - worker})
    phases.update({
        "first epoch (dataset reads, 4708 images, validation)": times["epoch1"] - times["training"],
        "final model, card, registration, usage accounting, job record":
            job["ended"] - times["epoch1"],
        "driver's exit, job end, CLI read-back": t_end - job["ended"]})
    phases["total (CLI start to exit)"] = t_end - t_cli
    phases["fixed start-up (total less the first epoch)"] = \
        t_end - t_cli - (times["epoch1"] - times["training"])
    return phases


def tensorflow_import_s(env: dict[str, str], masked: bool = False) -> float:
    """``import tensorflow`` in a fresh Python: plainly (scikit-learn too, as Ray's own
    TensorFlow backend made Ray Train's controller and workers do), or ``masked`` as the scorer
    actors and the train workers do it (``workers.models.import_tensorflow``, scikit-learn left
    out)."""
    code = "from medray.workers.models import import_tensorflow; print(import_tensorflow())" \
        if masked else "import time; t = time.perf_counter(); import tensorflow; " \
        "print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="score runs")
    parser.add_argument("--train-runs", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medray-bench-startup-"))
    home = Path(f"/tmp/mr-bst-{os.getpid()}")  # short: Ray's socket paths must stay < 108 bytes
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "RAY_")) and k not in ("MEDRAY_LAKE",)}
    same = {"MEDRAY_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2", "RAY_worker_niceness": "0"}
    env.update({**same, "AWS_EC2_METADATA_DISABLED": "true"})
    os.environ.update(same)
    from medray.cluster.infra import ray_local
    from medray.workers.models import build_model

    lake = str(work / "lake")
    runs: dict[str, list[dict[str, float]]] = {"score": [], "train": []}
    load: list[float] = []
    tf_import: dict[str, list[float]] = {"plain": [], "masked": []}
    try:
        ray_local.up(num_cpus=2, dashboard_port=None)
        _cli(env, "stage", str(DATA), "--dataset", "tiny", "--image-size", "28",
             "--label-names", "normal,pneumonia", "--lake", lake, "--json")
        model_file = work / "small.keras"
        build_model("small_cnn", 28, 1, 2, False, weights="none").save(model_file)
        _cli(env, "models", "register", str(model_file), "--name", "small", "--labels",
             "normal,pneumonia", "--lake", lake)
        for i in range(args.runs):
            load.append(os.getloadavg()[0])
            runs["score"].append(score_run(env, lake, "small:1"))
            print(f"score {i + 1}: " +
                  json.dumps({k: round(v, 2) for k, v in runs["score"][-1].items()}), flush=True)
        for i in range(args.train_runs):
            load.append(os.getloadavg()[0])
            runs["train"].append(train_run(env, lake, f"t{i}"))
            print(f"train {i + 1}: " +
                  json.dumps({k: round(v, 2) for k, v in runs["train"][-1].items()}), flush=True)
        if args.train_runs:
            for _ in range(2):
                tf_import["plain"].append(tensorflow_import_s(env))
                tf_import["masked"].append(tensorflow_import_s(env, masked=True))
    finally:
        ray_local.down()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    text = report(runs, load, tf_import, args)
    print(text)
    if not args.no_write:
        write_section("Start-up", text)


def _table(runs: list[dict[str, float]]) -> list[str]:
    lines = ["| phase | median s | min-max s |", "| --- | --- | --- |"]
    for phase in runs[0]:
        values = [r[phase] for r in runs]
        lines.append(f"| {phase} | {statistics.median(values):.2f} | "
                     f"{min(values):.2f}-{max(values):.2f} |")
    return lines


def report(runs: dict[str, list[dict[str, float]]], load: list[float],
           tf_import: dict[str, list[float]], args: argparse.Namespace) -> str:
    cmd = "make bench-startup" if (args.runs, args.train_runs) == (3, 2) else \
        f".venv/bin/python bench/bench_startup.py --runs {args.runs} --train-runs " \
        f"{args.train_runs}"
    lines = [
        "## Start-up", "",
        f"Command: `{cmd}` (bench/bench_startup.py). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, 24 GiB, no GPU; local Ray cluster with 2 CPUs, local-folder "
        f"lake; 1-minute load average at the runs {min(load):.1f}-{max(load):.1f} (shared "
        "machine). Seconds per phase on a warm cluster, median (min-max).", "",
    ]
    if runs["score"]:
        lines += [f"Score: `medray score --split test` (624 PneumoniaMNIST images at 28 px, a "
                  f"small CNN, default flags), {len(runs['score'])} run(s).", "",
                  *_table(runs["score"]), ""]
    if runs["train"]:
        lines += [f"Train: `medray train --epochs 1` (small CNN, 4708 PneumoniaMNIST images at "
                  f"28 px, default flags), {len(runs['train'])} run(s). TensorFlow's import "
                  f"alone, in a fresh Python: {statistics.median(tf_import['plain']):.2f} s "
                  "with scikit-learn (as Ray's own TensorFlow backend made Ray Train's "
                  "controller and workers import it), "
                  f"{statistics.median(tf_import['masked']):.2f} s without (the training loop, "
                  "in the job's driver for one CPU worker, and the scorer actors; Ray Train's "
                  "controller imports none).", "",
                  *_table(runs["train"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
