"""Staging benchmark: `medray stage` images/s against a single-process Pillow loop over the same
files, peak memory at sizes far apart (the goal: flat), and where the fixed start-up goes.

Two collections, both made from the real PneumoniaMNIST images (fixed seeds) in a temporary
folder:

- tiles: PNG and JPEG halves, 2x2 tiles of 28 px images upscaled to 256 px; baseline loop: read,
  sha256, open, convert('L'), resize to 128 px.
- jpeg: JPEGs like the paediatric chest X-rays of Kermany et al. that MedMNIST's images come
  from (1000-2000 px wide, 0.7-0.9 as high, gray with film-like grain, one in five stored as RGB,
  quality 85, about 100-250 KB each); baseline loop as a script for such files would run it:
  read, sha256, open, JPEG draft mode to 128 px, convert('L'), resize to 128 px.

It starts its own local Ray cluster (``--cpus``, default 2) under its own MEDRAY_HOME with a
local-folder lake and runs the real CLI. Memory is sampled from /proc (PSS, so shared pages are
not counted twice) for every process of that cluster: the job driver (the listing, the pending
shard, the seen-id set) and the decode actors. The start-up phases come from the job's record
and its log lines. The figures go into BENCHMARKS.md under "## Staging".

    .venv/bin/python bench/bench_stage.py        # tiles 2000, 20000, 60000; jpeg 1000, 5216
    .venv/bin/python bench/bench_stage.py --cases jpeg --jpeg-sizes 500,2000 --no-write
"""

from __future__ import annotations

import argparse
import hashlib
import io
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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import family, proc_table, smaps, write_section
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
MEDRAY = str(Path(sys.executable).parent / "medray")
SIDE = 256
STAGE_SIZE = 128
JPEG_WIDTH = (1000, 2000)
LOG_TS = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \[job [^\]]*\] ([\w.]+): (.*)")


# ---------------------------------------------------------------------------- the collections
def _make_tiles(args: tuple[str, int, int, int]) -> int:
    folder, start, stop, seed = args
    d = np.load(DATA)
    images, labels = d["train_images"], d["train_labels"].ravel()
    rng = np.random.default_rng(seed + start)
    for i in range(start, stop):
        idx = rng.integers(0, len(images), 4)
        tiles = [Image.fromarray(images[j]).resize((SIDE // 2, SIDE // 2),
                                                   Image.Resampling.BICUBIC) for j in idx]
        canvas = Image.new("L", (SIDE, SIDE))
        for k, tile in enumerate(tiles):
            canvas.paste(tile, ((k % 2) * SIDE // 2, (k // 2) * SIDE // 2))
        noise = rng.normal(0, 4, (SIDE, SIDE))
        img = Image.fromarray(np.clip(np.asarray(canvas) + noise, 0, 255).astype(np.uint8))
        label = "pneumonia" if labels[idx[0]] else "normal"
        out = Path(folder) / label
        if i % 2:
            img.save(out / f"img{i:06d}.jpg", quality=90)
        else:
            img.save(out / f"img{i:06d}.png")
    return stop - start


def _make_jpegs(args: tuple[str, int, int, int]) -> int:
    folder, start, stop, seed = args
    d = np.load(DATA)
    images, labels = d["train_images"], d["train_labels"].ravel()
    rng = np.random.default_rng(seed + start)
    # one grain field, cropped at random places: drawing fresh noise per image would cost more
    # than everything else here
    grain = rng.standard_normal((JPEG_WIDTH[1], JPEG_WIDTH[1])).astype(np.float32) * 3
    for i in range(start, stop):
        j = int(rng.integers(len(images)))
        w = int(rng.integers(*JPEG_WIDTH))
        h = int(w * rng.uniform(0.7, 0.9))
        y, x = (int(v) for v in rng.integers(0, JPEG_WIDTH[1] - w + 1, 2))
        big = np.asarray(Image.fromarray(images[j]).resize((w, h), Image.Resampling.BICUBIC))
        img = Image.fromarray(np.clip(big + grain[y:y + h, x:x + w], 0, 255).astype(np.uint8))
        if i % 5 == 4:  # some of the real files are RGB JPEGs of gray pictures
            img = img.convert("RGB")
        label = "PNEUMONIA" if labels[j] else "NORMAL"
        img.save(Path(folder) / label / f"person{i:05d}_{label.lower()}.jpeg", quality=85)
    return stop - start


def make_collection(maker: Callable[[tuple[str, int, int, int]], int], labels: tuple[str, ...],
                    folder: Path, count: int, seed: int = 0, procs: int = 2) -> None:
    for label in labels:
        (folder / label).mkdir(parents=True, exist_ok=True)
    step = 500
    jobs = [(str(folder), s, min(count, s + step), seed) for s in range(0, count, step)]
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(maker, jobs))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg", ".jpeg"))


# ---------------------------------------------------------------------------- baselines
def pillow_loop(paths: list[Path], draft: bool = False) -> tuple[float, float]:
    """(images/s, images per CPU second) of the plain loop a script would run: read, sha256,
    open, (``draft``: JPEG draft mode to the target size), convert, resize."""
    started, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as img:
            if draft:
                img.draft("L", (STAGE_SIZE, STAGE_SIZE))
            small = img.convert("L").resize((STAGE_SIZE, STAGE_SIZE),
                                            Image.Resampling.BILINEAR)
            np.asarray(small).tobytes()
    return (len(paths) / (time.perf_counter() - started),
            len(paths) / max(1e-6, time.process_time() - cpu))


CASES: dict[str, dict[str, Any]] = {
    "tiles": {"maker": _make_tiles, "labels": ("normal", "pneumonia"), "draft": False,
              "files": f"PNG and JPEG halves, {SIDE} px 2x2 tiles of PneumoniaMNIST (seed 0)",
              "loop": "per file read, sha256, Image.open, convert('L'), resize"},
    "jpeg": {"maker": _make_jpegs, "labels": ("NORMAL", "PNEUMONIA"), "draft": True,
             "files": (f"JPEGs {JPEG_WIDTH[0]}-{JPEG_WIDTH[1]} px wide, 0.7-0.9 as high, "
                       "PneumoniaMNIST images upscaled with film-like grain, one in five RGB, "
                       "quality 85 (seed 0)"),
             "loop": ("per file read, sha256, Image.open, draft('L', 128 px), convert('L'), "
                      "resize (the loop of the report in issue 17)")},
}


# ---------------------------------------------------------------------------- memory sampling
class MemorySampler(threading.Thread):
    """Peak PSS of this cluster's processes (found by its temp dir) and their children, and the
    driver's PSS over time."""

    def __init__(self, temp_dir: str, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.temp_dir, self.every = temp_dir, every_s
        self.stop_flag = threading.Event()
        self.peak_driver = self.peak_decoders = self.peak_total = 0
        self.peak_driver_anon = 0  # the driver's own heap (Python, Arrow), not mapped objects
        self.driver_series: list[tuple[float, int]] = []  # (time.time(), driver PSS kB)
        self.cpu_first: dict[int, int] = {}
        self.cpu_last: dict[int, int] = {}
        self.role: dict[int, str] = {}

    def cpu_seconds(self, role: str | None = None) -> float:
        """CPU time the cluster's processes (of one role: driver, decoders, other) used while
        sampled (user + system)."""
        ticks = sum(self.cpu_last[p] - self.cpu_first[p] for p in self.cpu_last
                    if role is None or self.role.get(p) == role)
        return ticks / os.sysconf("SC_CLK_TCK")

    def driver_mb_before(self, when: float | None) -> float:
        """The driver's peak PSS in MB up to ``when`` (listing and set-up, before streaming)."""
        return max((kb for t, kb in self.driver_series if when is None or t <= when),
                   default=0) / 1024

    def run(self) -> None:
        first = True
        while not self.stop_flag.is_set():
            table = proc_table()
            roots = {pid for pid, (_, cmd, _) in table.items() if self.temp_dir in cmd}
            driver = decoders = total = 0
            for pid in family(table, roots):
                ticks = table[pid][2]
                # a process born after the first sample used all its CPU during the run
                self.cpu_first.setdefault(pid, ticks if first else 0)
                self.cpu_last[pid] = ticks
                mem = smaps(pid)
                pss = mem.get("Pss", 0)
                total += pss
                cmd = table[pid][1]
                if "medray.jobs.entry" in cmd:
                    driver += pss
                    self.peak_driver_anon = max(self.peak_driver_anon, mem.get("Pss_Anon", 0))
                    self.role[pid] = "driver"
                elif "MapWorker" in cmd or "BatchDecoder" in cmd:
                    decoders += pss
                    self.role[pid] = "decoders"
                else:
                    self.role.setdefault(pid, "other")
            if driver:
                self.driver_series.append((time.time(), driver))
            self.peak_driver = max(self.peak_driver, driver)
            self.peak_decoders = max(self.peak_decoders, decoders)
            self.peak_total = max(self.peak_total, total)
            first = False
            self.stop_flag.wait(self.every)


# ---------------------------------------------------------------------------- start-up phases
def _cli(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([MEDRAY, *args], capture_output=True, text=True, env=env,
                          check=False, timeout=300)  # noqa: S603 - our own CLI
    if proc.returncode != 0:
        raise SystemExit(f"medray {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def _log_times(log: str) -> dict[str, float]:
    """When the job's driver logged the lines that end each start-up phase."""
    found: dict[str, float] = {}
    marks = {"listed": "listed in ", "pipeline": "decode pipeline starting",
             "first_batch": "first decoded batch"}
    for line in log.splitlines():
        m = LOG_TS.search(line)
        if not m:
            continue
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for key, text in marks.items():
            if text in m.group(3):
                found.setdefault(key, when)
    return found


PHASES = ("CLI and submission", "job driver start (supervisor, Python, imports, ray.init)",
          "listing the source", "version set-up (previous version, claim, job record)",
          "decoder actors start, first chunk decoded",
          "streaming the rest, shards, manifest, CLI exit")


def phases(env: dict[str, str], lake: Path, job_id: str, t_cli: float,
           t_end: float) -> dict[str, float]:
    """Seconds of each phase of one staging run (``PHASES``), from the job's record and log."""
    record = json.loads(_cli(env, "jobs", "show", job_id, "--lake", str(lake), "--json"))
    times = _log_times(_cli(env, "jobs", "logs", job_id))
    submitted = datetime.fromisoformat(record["submitted_at"]).timestamp()
    started = datetime.fromisoformat(record["started_at"]).timestamp()
    marks = [t_cli, submitted, started, times["listed"], times["pipeline"],
             times["first_batch"], t_end]
    return {name: b - a for name, a, b in zip(PHASES, marks[:-1], marks[1:], strict=True)}


# ---------------------------------------------------------------------------- staging runs
def stage(folder: Path, name: str, lake: Path, env: dict[str, str], temp_dir: str,
          shard_mb: float) -> dict[str, Any]:
    sampler = MemorySampler(temp_dir)
    sampler.start()
    t_cli = time.time()
    started = time.perf_counter()
    proc = subprocess.run(  # noqa: S603 - our own CLI
        [MEDRAY, "stage", str(folder), "--dataset", name, "--lake", str(lake),
         "--image-size", str(STAGE_SIZE), "--shard-mb", str(shard_mb), "--json"],
        capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    t_end = time.time()
    sampler.stop_flag.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"stage failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    phase = phases(env, lake, result["job_id"], t_cli, t_end)
    first_batch = t_cli + sum(list(phase.values())[:-1])
    return {"images": result["images"], "errors": result["errors"], "wall_s": wall,
            "job_s": result["seconds"], "shards": result["shards"],
            "stream_ips": result.get("stream_files_per_s") or 0.0,
            "cpu_s": sampler.cpu_seconds(),
            "cpu_by_role": {r: round(sampler.cpu_seconds(r), 1)
                            for r in ("driver", "decoders", "other")},
            "driver_mb": sampler.peak_driver / 1024,
            "driver_anon_mb": sampler.peak_driver_anon / 1024,
            "decoders_mb": sampler.peak_decoders / 1024,
            "driver_setup_mb": sampler.driver_mb_before(first_batch),
            "cluster_mb": sampler.peak_total / 1024, "phases": phase}


def run_case(case: str, size: int, work: Path, env: dict[str, str], temp_dir: str,
             shard_mb: float, load: list[float]) -> dict[str, Any]:
    spec = CASES[case]
    folder = work / f"{case}-{size}"
    t0 = time.perf_counter()
    make_collection(spec["maker"], spec["labels"], folder, size)
    paths = list_images(folder)
    mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{case}: {size} images ({mb:.0f} MB) made in {time.perf_counter() - t0:.0f}s",
          flush=True)
    load.append(os.getloadavg()[0])
    before, base_cpu = pillow_loop(paths, spec["draft"])
    run = stage(folder, f"{case}{size}", work / "lake", env, temp_dir, shard_mb)
    after, _ = pillow_loop(paths, spec["draft"])  # before and after: the machine's load drifts
    base = (before + after) / 2
    print(f"  pillow loop: {before:.0f} / {after:.0f} images/s", flush=True)
    load.append(os.getloadavg()[0])
    run.update({"size": size, "mb": mb, "pillow_ips": base, "pillow_per_cpu_s": base_cpu,
                "stage_per_cpu_s": run["images"] / max(1e-6, run["cpu_s"]),
                "stage_ips": run["images"] / run["wall_s"],
                "job_ips": run["images"] / run["job_s"]})
    print(f"  staging: {json.dumps(run)}", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="tiles,jpeg", help="tiles, jpeg or both")
    parser.add_argument("--sizes", default="2000,20000,60000", help="tiles collection sizes")
    parser.add_argument("--jpeg-sizes", default="1000,5216",
                        help="jpeg collection sizes (5216: the report's collection)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--shard-mb", type=float, default=16.0,
                        help="shard size: several shards even for the small collection")
    parser.add_argument("--niceness", type=int, default=0,
                        help="nice value of the Ray workers (Ray's default is 15)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    sizes = {"tiles": [int(s) for s in args.sizes.split(",")],
             "jpeg": [int(s) for s in args.jpeg_sizes.split(",")]}
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}: use {', '.join(CASES)}")
    work = Path(tempfile.mkdtemp(prefix="medray-bench-stage-"))
    home = work / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("MEDRAY_LAKE", "RAY_ADDRESS")}
    env.update({"MEDRAY_HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true"})
    # Ray starts workers at nice 15 by default; the Pillow loop runs at 0. On a machine shared
    # with other work that alone would starve the decoders, so both run at 0 here.
    os.environ.update({"MEDRAY_HOME": str(home), "RAY_worker_niceness": str(args.niceness)})
    from medray.cluster.infra import ray_local

    rows: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    load: list[float] = []
    try:
        info = ray_local.up(num_cpus=args.cpus, dashboard_port=None)
        for case in cases:
            for size in sizes[case]:
                rows[case].append(run_case(case, size, work, env, info["temp_dir"],
                                           args.shard_mb, load))
    finally:
        ray_local.down()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(rows, load, args)
    print(text)
    if not args.no_write:
        write_section("Staging", text)


def report(rows: dict[str, list[dict[str, Any]]], load: list[float],
           args: argparse.Namespace) -> str:
    default = args.sizes == "2000,20000,60000" and args.jpeg_sizes == "1000,5216" and \
        args.cases == "tiles,jpeg"
    cmd = "make bench-stage" if default else (
        f".venv/bin/python bench/bench_stage.py --cases {args.cases} --sizes {args.sizes} "
        f"--jpeg-sizes {args.jpeg_sizes}")
    lines = [
        "## Staging", "",
        f"Command: `{cmd}` (bench/bench_stage.py). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, local Ray cluster with {args.cpus} CPUs, local-folder lake; "
        f"1-minute load average during the runs {min(load):.1f}-{max(load):.1f} (the machine "
        f"is shared). Staged at {STAGE_SIZE} px gray, --shard-mb {args.shard_mb:g}; Ray "
        f"workers at nice {args.niceness} (RAY_worker_niceness; the Pillow loop runs at 0).",
        "",
        "Staging: `medray stage` end to end (submit, list, decode on the cluster, write zstd "
        "shards and the manifest); 'in job' counts from the job's start (listing) to its "
        "commit; 'streaming' is the rate once the first decoded batch arrived (job and actor "
        "start-up excluded). The Pillow loop runs just before and just after each staging run; "
        "the table has their mean. img per CPU-s: images per second of CPU used (the loop's "
        "process; for staging every process of the cluster, Ray's own included), which the "
        "load of other programs does not change. Driver PSS 'set-up' is its peak before the "
        "first decoded batch (listing included), 'peak' over the whole run, '(heap)' the peak "
        "of its anonymous memory alone (Python and Arrow; the rest is mapped object-store "
        "and library pages).",
    ]
    for case, runs in rows.items():
        if not runs:
            continue
        lines += ["", f"### {case}: {CASES[case]['files']}", "",
                  f"Baseline: one Python process, {CASES[case]['loop']} to {STAGE_SIZE} px.", "",
                  "| images | MB | Pillow loop img/s | stage end to end img/s (x) | "
                  "in job img/s (x) | streaming img/s (x) | img per CPU-s loop / stage | "
                  "shards | driver PSS MB set-up / peak (heap) | peak PSS decoders MB | "
                  "peak PSS cluster MB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in runs:
            base = r["pillow_ips"]
            lines.append(f"| {r['size']} | {r['mb']:.0f} | {base:.0f} | "
                         f"{r['stage_ips']:.0f} ({r['stage_ips'] / base:.2f}x) | "
                         f"{r['job_ips']:.0f} ({r['job_ips'] / base:.2f}x) | "
                         f"{r['stream_ips']:.0f} ({r['stream_ips'] / base:.2f}x) | "
                         f"{r['pillow_per_cpu_s']:.0f} / {r['stage_per_cpu_s']:.0f} | "
                         f"{r['shards']} | {r['driver_setup_mb']:.0f} / {r['driver_mb']:.0f} "
                         f"({r['driver_anon_mb']:.0f}) | "
                         f"{r['decoders_mb']:.0f} | {r['cluster_mb']:.0f} |")
        lines.append("")
        for r in runs:
            roles, loop_cpu = r["cpu_by_role"], r["size"] / r["pillow_per_cpu_s"]
            lines.append(f"- {r['size']} images: cluster CPU {r['cpu_s']:.1f} s = driver "
                         f"{roles['driver']} + decoders {roles['decoders']} + Ray's own "
                         f"processes {roles['other']}; the Pillow loop needs {loop_cpu:.1f} s.")
        if len(runs) >= 2 and runs[-1]["wall_s"] > runs[0]["wall_s"]:
            a, b = runs[0], runs[-1]
            marginal = (b["images"] - a["images"]) / max(1e-6, b["wall_s"] - a["wall_s"])
            base = sum(r["pillow_ips"] for r in runs) / len(runs)
            # memory from the two largest runs: the smallest never reaches the steady state
            m = runs[-2]
            per_image = (b["driver_mb"] - m["driver_mb"]) * 1024 * 1024 / max(
                1, b["images"] - m["images"])
            heap = (b["driver_anon_mb"] - m["driver_anon_mb"]) * 1024 * 1024 / max(
                1, b["images"] - m["images"])
            lines += ["", f"Marginal rate end to end, ({b['images']} - {a['images']}) images "
                      f"/ ({b['wall_s']:.1f} - {a['wall_s']:.1f}) s = {marginal:.0f} img/s, "
                      f"{marginal / base:.2f}x the Pillow loop's mean {base:.0f} img/s (fixed "
                      f"start-up seconds cancel out). Driver peak PSS {m['driver_mb']:.0f} -> "
                      f"{b['driver_mb']:.0f} MB from {m['images']} to {b['images']} images: "
                      f"{per_image:.0f} bytes per extra image; its heap {m['driver_anon_mb']:.0f}"
                      f" -> {b['driver_anon_mb']:.0f} MB, {heap:.0f} bytes per extra image."]
        lines += ["", "Start-up: seconds of each phase (from the job's record and its log "
                  "lines), one column per run.", "",
                  "| phase | " + " | ".join(f"{r['size']} images" for r in runs) + " |",
                  "| --- |" + " --- |" * len(runs)]
        for phase in PHASES:
            lines.append(f"| {phase} | " + " | ".join(f"{r['phases'][phase]:.2f}"
                                                      for r in runs) + " |")
        fixed = [sum(list(r["phases"].values())[:-1]) for r in runs]
        lines.append("| up to the first decoded batch | " + " | ".join(
            f"{f:.2f}" for f in fixed) + " |")
        lines.append(f"\nMedian start-up to the first decoded batch: "
                     f"{statistics.median(fixed):.1f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
