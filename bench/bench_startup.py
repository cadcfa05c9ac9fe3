"""Start-up benchmark: where the fixed seconds of a small `medray score` job go. The figures go
into BENCHMARKS.md under "## Start-up".

A local Ray cluster and a local-folder lake under a private MEDRAY_HOME; PneumoniaMNIST staged at
28 px; a small CNN registered; then `medray score --split test --json` (624 images, default
flags) run a few times. Each phase comes from a timestamp the job leaves behind:

- CLI and submission: the CLI process starts -> the job record's ``submitted_at``;
- job driver start: ``submitted_at`` -> ``started_at`` (Ray's job supervisor, the entrypoint's
  Python and imports, ``ray.init``);
- run set-up: ``started_at`` -> the driver's "scorer pool" log line (lake reads, lease, run.json);
- Ray Data planning and actor process start: that line -> the scorer actor's record, less
  the two next phases;
- TensorFlow import and model load (fetch + Keras load): timed inside the scorer actor;
- first batch (tracing included): the actor's "first batch" log line;
- the rest up to the CLI's exit (scoring 624 images, files, commit, usage, the CLI's read-back).

    .venv/bin/python bench/bench_startup.py            # 3 runs
    .venv/bin/python bench/bench_startup.py --runs 1 --no-write
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
import time
from datetime import datetime
from pathlib import Path

from benchlib import write_section

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
MEDRAY = str(Path(sys.executable).parent / "medray")
LOG_TS = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \[job [^\]]*\] ([\w.]+): (.*)")


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
        if msg.startswith("scorer pool:"):
            found.setdefault("pool", when)
        elif msg.startswith("scorer first batch"):
            found.setdefault("first_batch", when)
    return found


def one_run(env: dict[str, str], lake: str, model: str) -> dict[str, float]:
    t_cli = time.time()
    proc = _cli(env, "score", "--dataset", "tiny", "--model", model, "--split", "test",
                "--lake", lake, "--json")
    t_end = time.time()
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    record = json.loads(_cli(env, "jobs", "show", res["job_id"], "--lake", lake,
                             "--json").stdout)
    log = _cli(env, "jobs", "logs", res["job_id"]).stdout
    times = _log_times(log)
    actors_dir = Path(lake) / "runs" / res["run_id"] / "actors"
    actor = min((json.loads(p.read_text()) for p in actors_dir.glob("*.json")),
                key=lambda a: a["started_at"])
    submitted, started = _ts(record["submitted_at"]), _ts(record["started_at"])
    ready = _ts(actor["started_at"])
    boot = actor["startup"]
    phases = {
        "CLI and submission": submitted - t_cli,
        "job driver start (supervisor, Python, imports, ray.init)": started - submitted,
        "run set-up (lake reads, lease, run.json, sizing)": times["pool"] - started,
        "Ray Data planning and actor process start":
            ready - times["pool"] - boot["tensorflow_import_s"] - boot["model_load_s"],
        "TensorFlow import (in the actor)": boot["tensorflow_import_s"],
        "model fetch and load (in the actor)": boot["model_load_s"],
        "first batch, tracing included": times["first_batch"] - ready,
        "the rest: 624 images, files, commit, usage, CLI read-back": t_end - times["first_batch"],
    }
    phases["total (CLI start to exit)"] = t_end - t_cli
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
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
    runs: list[dict[str, float]] = []
    load: list[float] = []
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
            runs.append(one_run(env, lake, "small:1"))
            print(f"run {i + 1}: " + json.dumps({k: round(v, 2) for k, v in runs[-1].items()}),
                  flush=True)
    finally:
        ray_local.down()
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    text = report(runs, load, args)
    print(text)
    if not args.no_write:
        write_section("Start-up", text)


def report(runs: list[dict[str, float]], load: list[float], args: argparse.Namespace) -> str:
    cmd = "make bench-startup" if args.runs == 3 else \
        f".venv/bin/python bench/bench_startup.py --runs {args.runs}"
    lines = [
        "## Start-up", "",
        f"Command: `{cmd}` (bench/bench_startup.py). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, 24 GiB, no GPU; local Ray cluster with 2 CPUs, local-folder "
        f"lake; 1-minute load average at the runs {min(load):.1f}-{max(load):.1f} (shared "
        "machine). Job: `medray score --split test` (624 PneumoniaMNIST images at 28 px, a small "
        "CNN, default flags) on a warm cluster; seconds per phase, median of "
        f"{len(runs)} run(s) (min-max).", "",
        "| phase | median s | min-max s |", "| --- | --- | --- |",
    ]
    for phase in runs[0]:
        values = [r[phase] for r in runs]
        lines.append(f"| {phase} | {statistics.median(values):.2f} | "
                     f"{min(values):.2f}-{max(values):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
