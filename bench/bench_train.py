"""Training benchmark: the PneumoniaMNIST default-settings run (test AUROC and wall time),
images/s for 1 and 2 Ray Train workers, head mode on cached features vs full fine-tuning per
epoch, and one small_cnn epoch on 224 px images. Figures go into BENCHMARKS.md, "## Training".

It starts its own local Ray cluster (``--cpus``, default 2) under its own MEDRAY_HOME with a
local-folder lake and runs the real CLI (``medray stage``, ``medray train``); epoch times and
images/s come from the model cards the jobs register. Test AUROC is computed here with
scikit-learn on the staged test split, from the registered .keras file.

    .venv/bin/python bench/bench_train.py               # everything (about 15-25 minutes)
    .venv/bin/python bench/bench_train.py --only default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import RunFailed, medray, write_section

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
PARTS = ("default", "workers", "head", "x224")


def card(lake: Path, model: str, version: int) -> dict[str, Any]:
    return json.loads((lake / "models" / model / str(version) / "card.json").read_text())


def test_auroc(lake: Path, dataset: str, model: str, version: int) -> float:
    """AUROC of the pneumonia score on the staged test split, with scikit-learn."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from medray.workers.models import load_model

    manifest = json.loads((lake / "datasets" / dataset / "1" / "manifest.json").read_text())
    net = load_model(str(lake / "models" / model / str(version) / "model.keras"))
    labels = card(lake, model, version)["labels"]
    ys, scores = [], []
    for shard in manifest["shards"]:
        t = pq.read_table(lake / shard["path"], columns=["split", "labels", "pixels", "height",
                                                         "width", "channels"])
        t = t.filter(pc.equal(t.column("split"), "test"))
        if not t.num_rows:
            continue
        h, w, c = (t.column(k)[0].as_py() for k in ("height", "width", "channels"))
        x = np.frombuffer(b"".join(t.column("pixels").to_pylist()), np.uint8)
        x = x.reshape(t.num_rows, h, w, c).astype(np.float32)
        for i in range(0, len(x), 512):
            scores.append(np.asarray(net(x[i:i + 512], training=False))[:, labels.index(
                "pneumonia")])
        ys += [1 if "pneumonia" in (names or []) else 0 for names in
               t.column("labels").to_pylist()]
    return float(roc_auc_score(ys, np.concatenate(scores)))


def subset_npz(path: Path, per_split: dict[str, int], seed: int = 0) -> Path:
    d = np.load(DATA)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in per_split.items():
        idx = rng.choice(len(d[f"{split}_labels"]), n, replace=n > len(d[f"{split}_labels"]))
        out[f"{split}_images"] = d[f"{split}_images"][idx]
        out[f"{split}_labels"] = d[f"{split}_labels"][idx]
    np.savez(path, **out)
    return path


def epochs_of(c: dict[str, Any]) -> list[dict[str, Any]]:
    return list(c["metrics"]["history"])


def part_default(env: dict[str, str], lake: Path, out: dict[str, Any]) -> None:
    res, wall = medray(env, "train", "--dataset", "pneumonia", "--model", "default",
                       "--lake", str(lake))
    hist = epochs_of(card(lake, "default", res["version"]))
    out["default"] = {
        "wall_s": wall, "test_auroc": test_auroc(lake, "pneumonia", "default", res["version"]),
        "best_epoch": res["metrics"]["best_epoch"], "epochs_run": res["metrics"]["epochs_run"],
        "val_auroc": res["metrics"]["val_mean_auroc"],
        "epoch_s": float(np.median([h["seconds"] for h in hist])),
        "images_per_s": float(np.median([h["images_per_s"] for h in hist]))}


def part_workers(env: dict[str, str], lake: Path, out: dict[str, Any]) -> None:
    for workers, cpus in ((1, "1"), (2, "0.75")):
        res, wall = medray(env, "train", "--dataset", "pneumonia", "--model", f"w{workers}",
                           "--epochs", "3", "--workers", str(workers), "--cpus-per-worker",
                           cpus, "--lake", str(lake))
        hist = epochs_of(card(lake, f"w{workers}", res["version"]))[1:]  # warm epochs
        out[f"workers{workers}"] = {
            "cpus": cpus, "wall_s": wall,
            "images_per_s": float(np.median([h["images_per_s"] for h in hist])),
            "epoch_s": float(np.median([h["seconds"] for h in hist]))}


def part_head(env: dict[str, str], lake: Path, work: Path, out: dict[str, Any]) -> None:
    src = subset_npz(work / "p64.npz", {"train": 1000, "val": 200}, seed=1)
    medray(env, "stage", str(src), "--dataset", "p64", "--image-size", "64", "--label-names",
           "normal,pneumonia", "--shard-mb", "1", "--lake", str(lake))
    common = ("train", "--dataset", "p64", "--arch", "mobilenet_v2", "--epochs", "2",
              "--patience", "5", "--lake", str(lake))
    runs = {"full": medray(env, *common, "--model", "full"),
            "head_first": medray(env, *common, "--mode", "head", "--model", "head1"),
            "head_cached": medray(env, *common, "--mode", "head", "--model", "head2")}
    key = runs["head_first"][0]["features"]["key"]
    events = sorted((lake / "features" / key / "_events").glob("*.json"))
    out["feature_extract_s"] = sum(c["seconds"] for e in events
                                   for c in json.loads(e.read_text())["computed"])
    for name, (res, wall) in runs.items():
        hist = epochs_of(card(lake, res["model"], res["version"]))
        feats = res.get("features") or {}
        out[name] = {"wall_s": wall,
                     "epoch_s": float(np.median([h["seconds"] for h in hist])),
                     "images_per_s": float(np.median([h["images_per_s"] for h in hist])),
                     "features": {k: feats[k] for k in ("computed_shards", "reused_shards")}
                     if feats else None}


def part_x224(env: dict[str, str], lake: Path, work: Path, out: dict[str, Any]) -> None:
    src = subset_npz(work / "p224.npz", {"train": 2000, "val": 200}, seed=2)
    medray(env, "stage", str(src), "--dataset", "p224", "--image-size", "224", "--label-names",
           "normal,pneumonia", "--lake", str(lake))
    res, wall = medray(env, "train", "--dataset", "p224", "--model", "x224", "--epochs", "2",
                       "--lake", str(lake))
    hist = epochs_of(card(lake, "x224", res["version"]))
    out["x224"] = {"wall_s": wall, "epoch_s": [h["seconds"] for h in hist],
                   "images_per_s": [h["images_per_s"] for h in hist],
                   "val_auroc": res["metrics"]["val_mean_auroc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--only", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args()
    parts = [p for p in PARTS if p in args.only.split(",")]
    work = Path(tempfile.mkdtemp(prefix="medray-bench-train-"))
    home, lake = work / "home", work / "lake"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("MEDRAY_LAKE", "RAY_ADDRESS",
                                                      "MEDRAY_FAULT")}
    env.update({"MEDRAY_HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true",
                "TF_CPP_MIN_LOG_LEVEL": "2"})
    os.environ.update({"MEDRAY_HOME": str(home)})
    from medray.cluster.infra import ray_local

    out: dict[str, Any] = {}
    failed: dict[str, str] = {}
    load: list[float] = []
    try:
        ray_local.up(num_cpus=args.cpus, dashboard_port=None)
        if {"default", "workers"} & set(parts):
            medray(env, "stage", str(DATA), "--dataset", "pneumonia", "--image-size", "28",
                   "--label-names", "normal,pneumonia", "--lake", str(lake))
        for part in parts:
            load.append(os.getloadavg()[0])
            try:
                if part == "default":
                    part_default(env, lake, out)
                elif part == "workers":
                    part_workers(env, lake, out)
                elif part == "head":
                    part_head(env, lake, work, out)
                else:
                    part_x224(env, lake, work, out)
            except RunFailed as exc:
                failed[part] = str(exc)
            load.append(os.getloadavg()[0])
            print(part, json.dumps({k: v for k, v in out.items()}), failed.get(part, ""),
                  flush=True)
    finally:
        ray_local.down()
        shutil.rmtree(work, ignore_errors=True)
    text = report(args, parts, out, failed, load)
    print(text)
    if not args.no_write:
        write_section("Training", text)


def report(args: argparse.Namespace, parts: list[str], out: dict[str, Any],
           failed: dict[str, str], load: list[float]) -> str:
    cmd = "make bench-train" if parts == list(PARTS) else (
        f".venv/bin/python bench/bench_train.py --only {args.only}")
    lines = [
        "## Training", "",
        f"Command: `{cmd}` (bench/bench_train.py). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, no GPU; local Ray cluster with {args.cpus} CPUs, local-folder "
        f"lake; 1-minute load average during the runs {min(load or [0]):.1f}-"
        f"{max(load or [0]):.1f} (the machine is shared with other work, so times are upper "
        "bounds). Every run is the real CLI end to end; epoch times and images/s (global, "
        "including waiting for data) come from the registered model cards.", ""]
    for part, why in failed.items():
        lines += [f"Part `{part}` did not finish: {why}.", ""]
    if "default" in out:
        d = out["default"]
        lines += [
            "Default settings on PneumoniaMNIST (`medray stage "
            "../shared/data/pneumoniamnist.npz --dataset pneumonia --image-size 28 "
            "--label-names normal,pneumonia`, then `medray train --dataset pneumonia --model "
            "default`: small_cnn, Adam 2e-3, batch 64, up to 12 epochs, patience 4, class "
            "weights auto, 1 worker x 1 CPU):", "",
            "| test AUROC (624 images) | best val AUROC | best epoch / run | median epoch s | "
            "median images/s | wall time of `medray train` |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {d['test_auroc']:.4f} | {d['val_auroc']:.4f} | {d['best_epoch']} / "
            f"{d['epochs_run']} | {d['epoch_s']:.1f} | {d['images_per_s']:.0f} | "
            f"{d['wall_s']:.0f} s |", ""]
    if "workers1" in out and "workers2" in out:
        lines += [
            "Ray Train workers (same data, 3 epochs, median of epochs 2-3). With 2 CPUs both "
            "workers share the same two cores, so this shows the cost of the collective "
            "all-reduce and of splitting the data, not a speed-up; more nodes add cores:", "",
            "| workers x CPUs | images/s | epoch s | wall time |", "| --- | --- | --- | --- |"]
        for w in (1, 2):
            r = out[f"workers{w}"]
            lines.append(f"| {w} x {r['cpus']} | {r['images_per_s']:.0f} | {r['epoch_s']:.1f} | "
                         f"{r['wall_s']:.0f} s |")
        lines.append("")
    if "full" in out:
        lines += [
            "Head mode vs full fine-tuning (MobileNetV2, random init, 1000 train images at "
            "64 px, 2 epochs): `--mode head` computes the backbone features once (Ray Data, "
            "cached in the lake) and then trains only the classifier; the second head run "
            "reuses the cache and never runs the backbone.", "",
            "| run | median epoch s | images/s | wall time | feature shards computed / reused |",
            "| --- | --- | --- | --- | --- |"]
        for name in ("full", "head_first", "head_cached"):
            r = out[name]
            f = r["features"] or {}
            lines.append(f"| {name.replace('_', ' ')} | {r['epoch_s']:.2f} | "
                         f"{r['images_per_s']:.0f} | {r['wall_s']:.0f} s | "
                         f"{f.get('computed_shards', '-')} / {f.get('reused_shards', '-')} |")
        lines += ["", f"Feature extraction (once, in the first head run): "
                      f"{out['feature_extract_s']:.1f} s.", ""]
    if "x224" in out:
        r = out["x224"]
        lines += [
            "224 px (2000 train images: PneumoniaMNIST upsampled at staging), default "
            f"small_cnn, 2 epochs: epoch times {', '.join(f'{s:.0f}' for s in r['epoch_s'])} s"
            f" ({', '.join(f'{v:.0f}' for v in r['images_per_s'])} images/s), so the default "
            f"12 epochs take about {12 * max(r['epoch_s']) / 60:.0f} minutes; wall time of the "
            f"2-epoch run {r['wall_s']:.0f} s, val AUROC {r['val_auroc']:.3f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
