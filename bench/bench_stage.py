"""Staging benchmark: `medray stage` images/s against a single-process Pillow loop over the same
files, and peak memory for a small and a 10x larger collection (the goal: flat).

It builds PNG and JPEG files from the real PneumoniaMNIST images (2x2 tiles of 28 px images
upscaled to 256 px, fixed seed) in a temporary folder, starts its own local Ray cluster
(``--cpus``, default 2) under its own MEDRAY_HOME with a local-folder lake, and runs the real
CLI. Memory is sampled from /proc (PSS, so shared pages are not counted twice) for every
process of that cluster: the job driver (which holds the pending shard and the seen-id set)
and the decode actors. The figures go into BENCHMARKS.md under "## Staging".

    .venv/bin/python bench/bench_stage.py                      # 2000, 20000 and 60000 images
    .venv/bin/python bench/bench_stage.py --sizes 500,2000     # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import family, proc_table, smaps_kb, write_section
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
MEDRAY = str(Path(sys.executable).parent / "medray")
SIDE = 256
STAGE_SIZE = 128


# ---------------------------------------------------------------------------- the collection
def _make_chunk(args: tuple[str, int, int, int]) -> int:
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


def make_collection(folder: Path, count: int, seed: int = 0, procs: int = 2) -> None:
    for label in ("normal", "pneumonia"):
        (folder / label).mkdir(parents=True, exist_ok=True)
    step = 500
    jobs = [(str(folder), s, min(count, s + step), seed) for s in range(0, count, step)]
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_make_chunk, jobs))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))


# ---------------------------------------------------------------------------- baseline
def pillow_loop(paths: list[Path]) -> tuple[float, float]:
    """(images/s, images per CPU second) of the plain loop a script would run: read, sha256,
    open, convert, resize."""
    started, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        data = path.read_bytes()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as img:
            small = img.convert("L").resize((STAGE_SIZE, STAGE_SIZE),
                                            Image.Resampling.BILINEAR)
            np.asarray(small).tobytes()
    return (len(paths) / (time.perf_counter() - started),
            len(paths) / max(1e-6, time.process_time() - cpu))


# ---------------------------------------------------------------------------- memory sampling
class MemorySampler(threading.Thread):
    """Peak PSS of this cluster's processes (found by its temp dir) and their children."""

    def __init__(self, temp_dir: str, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.temp_dir, self.every = temp_dir, every_s
        self.stop_flag = threading.Event()
        self.peak_driver = self.peak_decoders = self.peak_total = 0
        self.cpu_first: dict[int, int] = {}
        self.cpu_last: dict[int, int] = {}
        self.role: dict[int, str] = {}

    def cpu_seconds(self, role: str | None = None) -> float:
        """CPU time the cluster's processes (of one role: driver, decoders, other) used while
        sampled (user + system)."""
        ticks = sum(self.cpu_last[p] - self.cpu_first[p] for p in self.cpu_last
                    if role is None or self.role.get(p) == role)
        return ticks / os.sysconf("SC_CLK_TCK")

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
                pss = smaps_kb(pid, "Pss")
                total += pss
                cmd = table[pid][1]
                if "medray.jobs.entry" in cmd:
                    driver += pss
                    self.role[pid] = "driver"
                elif "MapWorker" in cmd or "BatchDecoder" in cmd:
                    decoders += pss
                    self.role[pid] = "decoders"
                else:
                    self.role.setdefault(pid, "other")
            self.peak_driver = max(self.peak_driver, driver)
            self.peak_decoders = max(self.peak_decoders, decoders)
            self.peak_total = max(self.peak_total, total)
            first = False
            self.stop_flag.wait(self.every)


# ---------------------------------------------------------------------------- staging runs
def stage(folder: Path, name: str, lake: Path, env: dict[str, str], temp_dir: str,
          shard_mb: float) -> dict[str, Any]:
    sampler = MemorySampler(temp_dir)
    sampler.start()
    started = time.perf_counter()
    proc = subprocess.run(  # noqa: S603 - our own CLI
        [MEDRAY, "stage", str(folder), "--dataset", name, "--lake", str(lake),
         "--image-size", str(STAGE_SIZE), "--shard-mb", str(shard_mb), "--json"],
        capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    sampler.stop_flag.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"stage failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"images": result["images"], "errors": result["errors"], "wall_s": wall,
            "job_s": result["seconds"], "shards": result["shards"],
            "stream_ips": result.get("stream_files_per_s") or 0.0,
            "cpu_s": sampler.cpu_seconds(),
            "cpu_by_role": {r: round(sampler.cpu_seconds(r), 1)
                            for r in ("driver", "decoders", "other")},
            "driver_mb": sampler.peak_driver / 1024, "decoders_mb": sampler.peak_decoders / 1024,
            "cluster_mb": sampler.peak_total / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,20000,60000", help="collection sizes to stage")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--shard-mb", type=float, default=16.0,
                        help="shard size: several shards even for the small collection")
    parser.add_argument("--niceness", type=int, default=0,
                        help="nice value of the Ray workers (Ray's default is 15)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="medray-bench-stage-"))
    home = work / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("MEDRAY_LAKE", "RAY_ADDRESS")}
    env.update({"MEDRAY_HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true"})
    # Ray starts workers at nice 15 by default; the Pillow loop runs at 0. On a machine shared
    # with other work that alone would starve the decoders, so both run at 0 here.
    os.environ.update({"MEDRAY_HOME": str(home), "RAY_worker_niceness": str(args.niceness)})
    from medray.cluster.infra import ray_local

    rows, load = [], []
    try:
        info = ray_local.up(num_cpus=args.cpus, dashboard_port=None)
        for size in sizes:
            folder = work / f"images-{size}"
            t0 = time.perf_counter()
            make_collection(folder, size)
            paths = list_images(folder)
            mb = sum(p.stat().st_size for p in paths) / 1e6
            print(f"{size} images ({mb:.0f} MB) made in {time.perf_counter() - t0:.0f}s",
                  flush=True)
            load.append(os.getloadavg()[0])
            before, base_cpu = pillow_loop(paths)
            run = stage(folder, f"bench{size}", work / "lake", env, info["temp_dir"],
                        args.shard_mb)
            after, _ = pillow_loop(paths)  # before and after: the machine's load drifts
            base = (before + after) / 2
            print(f"  pillow loop: {before:.0f} / {after:.0f} images/s", flush=True)
            load.append(os.getloadavg()[0])
            run.update({"size": size, "mb": mb, "pillow_ips": base, "pillow_per_cpu_s": base_cpu,
                        "stage_per_cpu_s": run["images"] / max(1e-6, run["cpu_s"]),
                        "stage_ips": run["images"] / run["wall_s"],
                        "job_ips": run["images"] / run["job_s"]})
            print(f"  staging: {json.dumps(run)}", flush=True)
            rows.append(run)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        ray_local.down()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    cmd = "make bench-stage" if args.sizes == "2000,20000,60000" else (
        f".venv/bin/python bench/bench_stage.py --sizes {args.sizes}")
    lines = [
        "## Staging", "",
        f"Command: `{cmd}` (bench/bench_stage.py). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, local Ray cluster with {args.cpus} CPUs, local-folder lake; "
        f"1-minute load average during the runs {min(load):.1f}-{max(load):.1f} (the machine "
        f"is shared). Files: PNG and JPEG halves, {SIDE} px 2x2 tiles of PneumoniaMNIST "
        f"(seed 0), staged at {STAGE_SIZE} px gray, --shard-mb {args.shard_mb:g}; Ray workers "
        f"at nice {args.niceness} (RAY_worker_niceness; the Pillow loop runs at 0).",
        "",
        "Baseline: one Python process, per file read, sha256, Image.open, convert('L'), "
        f"resize to {STAGE_SIZE} px. Staging: `medray stage` end to end (submit, list, "
        "decode on the cluster, write zstd shards and the manifest); 'in job' counts from the "
        "job's start (listing) to its commit; 'streaming' is the rate once the first decoded "
        "batch arrived (job and actor start-up excluded). The Pillow loop runs just before and "
        "just after each staging run; the table has their mean. img per CPU-s: images per "
        "second of CPU used (the loop's process; for staging every process of the cluster, "
        "Ray's own included), which the load of other programs does not change.", "",
        "| images | MB | Pillow loop img/s | stage end to end img/s (x) | in job img/s (x) | "
        "streaming img/s (x) | img per CPU-s loop / stage | shards | peak PSS driver MB | "
        "peak PSS decoders MB | peak PSS cluster MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = r["pillow_ips"]
        lines.append(f"| {r['size']} | {r['mb']:.0f} | {base:.0f} | "
                     f"{r['stage_ips']:.0f} ({r['stage_ips'] / base:.2f}x) | "
                     f"{r['job_ips']:.0f} ({r['job_ips'] / base:.2f}x) | "
                     f"{r['stream_ips']:.0f} ({r['stream_ips'] / base:.2f}x) | "
                     f"{r['pillow_per_cpu_s']:.0f} / {r['stage_per_cpu_s']:.0f} | "
                     f"{r['shards']} | {r['driver_mb']:.0f} | {r['decoders_mb']:.0f} | "
                     f"{r['cluster_mb']:.0f} |")
    lines.append("")
    for r in rows:
        roles, loop_cpu = r["cpu_by_role"], r["size"] / r["pillow_per_cpu_s"]
        lines.append(f"- {r['size']} images: cluster CPU {r['cpu_s']:.1f} s = driver "
                     f"{roles['driver']} + decoders {roles['decoders']} + Ray's own processes "
                     f"{roles['other']}; the Pillow loop needs {loop_cpu:.1f} s.")
    if len(rows) >= 2 and rows[-1]["wall_s"] > rows[0]["wall_s"]:
        a, b = rows[0], rows[-1]
        marginal = (b["images"] - a["images"]) / max(1e-6, b["wall_s"] - a["wall_s"])
        base = sum(r["pillow_ips"] for r in rows) / len(rows)
        lines += ["", f"Marginal rate end to end, ({b['images']} - {a['images']}) images / "
                  f"({b['wall_s']:.1f} - {a['wall_s']:.1f}) s = {marginal:.0f} img/s, "
                  f"{marginal / base:.2f}x the Pillow loop's mean {base:.0f} img/s (fixed "
                  "start-up seconds cancel out). Memory: the driver holds at most one shard of "
                  "pixels and one id per image: from one full shard on, its peak should not "
                  "grow with the collection (compare the rows)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        write_section("Staging", text)


if __name__ == "__main__":
    main()
