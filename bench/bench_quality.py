"""Quality benchmark (issue 15): scores a clinician can trust, measured. Figures go into
BENCHMARKS.md, "## Quality".

Parts:
- ``defect``: the training defect (validation loss 0.1 <-> 16 while training loss fell) and its
  fix, per epoch: train loss and validation loss with the old loop (BatchNorm moving
  averages) and with the fixed one (statistics re-estimated each epoch), at 28 px and at 128 px
  (the real PneumoniaMNIST images resized). In-process with medray's own workers code (model,
  loss, distributed step, class weights, ``precise_batchnorm``), for speed.
- ``variants``: the defaults and the variants tried, in-process at 28 px over the seeds, with
  the test numbers computed as training and a report would (calibration and the Youden point
  on validation), and for the same models with the class-balanced bias
  (``--calibration-form temperature+balanced-bias``). Some variants probe training-loop
  ideas medray does not have (``LOOP_PROBES``: a weight average, mixup, an ensemble), marked
  "not in medray".
- ``seeds``: the defaults on PneumoniaMNIST over seeds 0, 1, 2 through the real CLI (stage,
  train, score the test split, report): test AUROC, test ECE before and after calibration,
  sensitivity and specificity at the Youden point chosen on validation, with the times.
- ``xray``: a folder of PNG chest X-rays (``root/<split>/<label>/*.png``, all 5,030
  PneumoniaMNIST images resized to 128 and 224 px) staged and trained through the CLI with the
  defaults and the variants tried, to choose defaults for folder-of-X-ray datasets that train
  well on 2 CPU cores within 30 minutes.

It starts its own local Ray cluster (``--cpus``, default 2) under its own MEDRAY_HOME with a
local-folder lake.

    .venv/bin/python bench/bench_quality.py                 # everything (about 40 minutes)
    .venv/bin/python bench/bench_quality.py --only seeds
    .venv/bin/python bench/bench_quality.py --only variants "--variants=--no-augment"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import RunFailed, medray, write_section

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist.npz"
PARTS = ("defect", "variants", "seeds", "xray")
LABELS = ["normal", "pneumonia"]
GOALS = {"auroc": 0.96, "ece": 0.05, "rate": 0.85}
# in-process variants of the defaults tried at 28 px: (name, TrainSpec fields, build_model
# keywords beyond the spec's)
VARIANTS: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
    ("defaults", {}, {}), ("--no-augment", {"augment": False}, {}),
    ("--augment-recipe light", {"augment_recipe": "light"}, {}),
    ("flip, crop 0.1, rotation 0.03, brightness 0.1 (--augment before 2026-12-01)", {},
     {"augment": "flip,crop=0.1,rotation=0.03,brightness=0.1"}),
    ("--learning-rate 1e-3", {"learning_rate": 1e-3}, {}),
    ("--class-weights none", {"class_weights": "none"}, {}),
    ("--epochs 20 --patience 6", {"epochs": 20, "patience": 6}, {}),
    ("per-image standardisation", {}, {"standardize": True}),
    ("defaults with flip", {}, {"augment": "flip,crop=0.05,rotation=0.02,brightness=0.1"}),
    ("dropout 0.5", {}, {"dropout": 0.5}),
    ("crop 0.15, rotation 0.05, brightness 0.2", {},
     {"augment": "crop=0.15,rotation=0.05,brightness=0.2"}),
    ("crop 0.15, rotation 0.05, brightness 0.1", {},
     {"augment": "crop=0.15,rotation=0.05,brightness=0.1"}),
    ("crop 0.25, rotation 0.08, brightness 0.3", {},
     {"augment": "crop=0.25,rotation=0.08,brightness=0.3"}),
    ("crop 0.25, rotation 0.02, brightness 0.3", {},
     {"augment": "crop=0.25,rotation=0.02,brightness=0.3"}),
    ("crop 0.05, rotation 0.02, brightness 0.3", {},
     {"augment": "crop=0.05,rotation=0.02,brightness=0.3"}),
    ("crop 0.25, rotation 0.02, brightness 0.1", {},
     {"augment": "crop=0.25,rotation=0.02,brightness=0.1"}),
    ("crop 0.25, rotation 0.02, brightness 0.1, --epochs 24 --patience 8",
     {"epochs": 24, "patience": 8}, {"augment": "crop=0.25,rotation=0.02,brightness=0.1"}),
    ("weight EMA 0.99 (not in medray)", {}, {}), ("weight EMA 0.95 (not in medray)", {}, {}),
    ("mixup 0.2 (not in medray)", {}, {}),
    ("weight EMA 0.99 and mixup 0.2 (not in medray)", {}, {}),
    ("ensemble of 3 (not in medray)", {}, {}))
# tenth session: what the training loop itself could do beyond medray's (probes: none of them
# is a medray flag). "ema": validate and keep an exponential moving average of the trainable
# weights (decay per step), BatchNorm statistics re-estimated for it as for the live weights;
# "mixup": each batch's images and one-hot targets mixed with a shuffled copy of the batch,
# lambda ~ Beta(a, a) per image (Zhang et al., ICLR 2018); "ensemble": seed s trains seeds
# 3s, 3s+1, 3s+2 and averages their probabilities (Lakshminarayanan et al., NeurIPS 2017).
LOOP_PROBES: dict[str, dict[str, float]] = {
    "weight EMA 0.99 (not in medray)": {"ema": 0.99},
    "weight EMA 0.95 (not in medray)": {"ema": 0.95},
    "mixup 0.2 (not in medray)": {"mixup": 0.2},
    "weight EMA 0.99 and mixup 0.2 (not in medray)": {"ema": 0.99, "mixup": 0.2},
    "ensemble of 3 (not in medray)": {"ensemble": 3}}
VARIANTS_ONLY: list[str] = []  # --variants: a subset of VARIANTS by name
# folder-of-X-ray settings tried: (name, size, extra `medray train` flags)
XRAY_ONLY: list[str] = []  # --xray-runs: a subset of XRAY_RUNS as NAME@SIZE
XRAY_RUNS = (("defaults", 128, ()), ("--no-augment", 128, ("--no-augment",)),
             ("defaults", 224, ()))


# ------------------------------------------------------------------------------ the defect


def resized(size: int) -> dict[str, np.ndarray]:
    """PneumoniaMNIST's official splits at ``size`` px (bilinear), one-hot targets."""
    from PIL import Image

    d = np.load(DATA)
    out = {}
    for split in ("train", "val", "test"):
        x = d[f"{split}_images"]
        if size != x.shape[1]:
            x = np.stack([np.asarray(Image.fromarray(im).resize(
                (size, size), Image.Resampling.BILINEAR)) for im in x])
        out[f"{split}_x"] = x[..., None].astype(np.uint8)
        out[f"{split}_y"] = np.eye(2, dtype=np.float32)[d[f"{split}_labels"][:, 0]]
    return out


def train_in_process(d: dict[str, np.ndarray], size: int, fixed: bool, seed: int = 0,
                     build: dict[str, Any] | None = None, ema: float = 0.0, mixup: float = 0.0,
                     **flags: Any) -> tuple[list[dict[str, float]], Any]:
    """The training loop of cluster/train/remote.py without Ray, on TrainSpec defaults
    overridden by ``flags`` (spec fields): per epoch (train loss, validation loss as the loop
    logs it, validation AUROC), with early stopping on validation AUROC; returns the rows and
    the model with the best epoch's weights. ``ema`` and ``mixup`` are LOOP_PROBES' (0: off,
    medray's loop)."""
    import keras
    import tensorflow as tf

    from medray.workers import training as tr
    from medray.workers.models import build_model, parse_augment
    from medray.workers.specs import TrainSpec

    spec = TrainSpec(dataset="d", model="m", seed=seed, **flags).for_images(size)
    keras.utils.set_random_seed(seed)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    counts = {lab: int(d["train_y"][:, j].sum()) for j, lab in enumerate(LABELS)}
    pos, neg = tr.class_weights(counts, LABELS, len(d["train_y"]), False) \
        if spec.class_weights == "auto" else (None, None)
    plan = tr.plan_batches(len(d["train_y"]), spec.batch_size, 1, tr.local_replicas(strategy))
    with strategy.scope():
        shape = {"augment": spec.augment_recipe if spec.augment else None,
                 **(build or {})}  # a recipe as text, too
        shape["augment"] = parse_augment(shape["augment"])
        model = build_model(spec.arch, size, 1, 2, False, seed=seed, **shape)
        opt = keras.optimizers.Adam(learning_rate=spec.learning_rate)
        opt.build(model.trainable_variables)
        loss_fn = tr.make_loss(False, pos, neg)
        step = tr.make_train_step(strategy, model, opt, loss_fn, plan.global_batch)
    rng = np.random.default_rng(seed)
    probe_rng = np.random.default_rng(seed + 1000)
    weights = model.trainable_variables
    average = [w.numpy().copy() for w in weights] if ema else []
    rows: list[dict[str, float]] = []
    state = tr.new_state()
    best = model.get_weights()
    for epoch in range(1, spec.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(len(d["train_y"]))[:plan.steps * plan.global_batch]
        batches = [order[i:i + plan.global_batch] for i in range(0, len(order),
                                                                  plan.global_batch)]
        losses = []
        for b in batches:
            x, y = d["train_x"][b], d["train_y"][b]
            if mixup:
                lam = probe_rng.beta(mixup, mixup, size=(len(b), 1)).astype(np.float32)
                other = probe_rng.permutation(len(b))
                x = lam[:, :, None, None] * x + (1 - lam[:, :, None, None]) * x[other]
                y = lam * y + (1 - lam) * y[other]
            losses.append(float(step(x, y)))
            if ema:
                for a, w in zip(average, weights, strict=True):
                    a *= ema
                    a += (1 - ema) * w.numpy()
        live = [w.numpy().copy() for w in weights] if ema else []
        if ema:  # the average is validated (and kept when best) in place of the live weights
            for a, w in zip(average, weights, strict=True):
                w.assign(a)
        if fixed:  # what _close_epoch does now: the last BN_IMAGES training images
            recent = batches[-max(1, tr.BN_IMAGES // plan.global_batch):]
            tr.precise_batchnorm(model, [d["train_x"][b] for b in recent])
        scores = tr.predict(model, [d["val_x"][i:i + 256] for i in range(0, len(d["val_x"]),
                                                                        256)])
        row = {"epoch": epoch, "loss": float(np.mean(losses)),
               "val_loss": tr.mean_loss(loss_fn, d["val_y"], scores),
               "val_mean_auroc": tr.evaluate(d["val_y"], scores, LABELS)["mean_auroc"],
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        improved, stop = tr.end_epoch(state, dict(row), spec.patience, spec.epochs)
        if improved:
            best = model.get_weights()
        if ema:  # training goes on from the live weights
            for v, w in zip(live, weights, strict=True):
                w.assign(v)
        print(f"{size}px fixed={fixed} {flags} seed {seed} epoch {epoch}: {json.dumps(row)}",
              flush=True)
        if stop:
            break
    model.set_weights(best)
    return rows, model


def test_numbers(model: Any, d: dict[str, np.ndarray]) -> dict[str, Any]:
    """What training registers and a report measures, in-process: calibration with the
    temperature alone and the Youden point on validation, then the pneumonia label on test;
    and the same model calibrated with the class-balanced bias (``--calibration-form
    temperature+balanced-bias``, the default after a recipe that crops 0.15 or more), which
    costs no training."""
    from medray.workers import metrics
    from medray.workers import training as tr
    from medray.workers.calibration import BALANCED, TEMPERATURE, apply_card
    from medray.workers.operating_points import parse
    from medray.workers.validation import summarise

    def scores(split: str) -> np.ndarray:
        x = d[f"{split}_x"]
        return tr.predict(model, [x[i:i + 256] for i in range(0, len(x), 256)])

    val, raw = scores("val"), scores("test")
    y = d["test_y"][:, 1]

    def on_test(form: str) -> dict[str, Any]:
        found = summarise(d["val_y"], val, None, LABELS, False, "val", parse("youden"),
                          n_boot=0, form=form)
        card = found["calibration"]
        cal = apply_card(raw, card, LABELS, False)[:, 1]
        at = metrics.threshold_metrics(y, cal, found["thresholds"]["pneumonia"])
        return {"form": card["form"]["pneumonia"], "bias": card["bias"]["pneumonia"],
                "val_ece": card["ece_after"]["pneumonia"], "auroc": metrics.auroc(y, cal),
                "ece": metrics.calibration(y, cal)["ece"],
                "temperature": card["temperature"]["pneumonia"],
                "threshold": found["thresholds"]["pneumonia"], "mean_score": float(cal.mean()),
                "sensitivity": at["sensitivity"], "specificity": at["specificity"]}

    balanced = on_test(BALANCED)
    return {**on_test(TEMPERATURE),
            "ece_raw": metrics.calibration(y, raw[:, 1])["ece"],
            "val_ece_balanced": balanced["val_ece"], "ece_balanced": balanced["ece"]}


def part_defect(out: dict[str, Any], save: Any) -> None:
    """Both loops for the full 12 epochs (no early stop), at 28 and 128 px."""
    for size in (28, 128):
        if f"defect{size}" in out:
            continue  # measured in an earlier sitting (--results)
        d = resized(size)
        out[f"defect{size}"] = {
            "before": train_in_process(d, size, False, patience=100)[0],
            "after": train_in_process(d, size, True, patience=100)[0]}
        save()


def variants_key(size: int) -> str:
    """Where a size's variants are kept in the results: 28 px (PneumoniaMNIST as it is) under
    ``variants``, as before other sizes were measured; others under ``variants@SIZE``."""
    return "variants" if size == 28 else f"variants@{size}"


def part_variants(out: dict[str, Any], seeds: list[int], save: Any, size: int = 28) -> None:
    """The defaults and the variants tried, in-process at ``size`` px (PneumoniaMNIST resized
    as the defect part does), each over ``seeds``."""
    d = resized(size)
    for name, flags, build in VARIANTS:
        if VARIANTS_ONLY and name not in VARIANTS_ONLY:
            continue
        runs = out.setdefault(variants_key(size), {}).setdefault(name, [])
        for seed in seeds:
            if any(r["seed"] == seed for r in runs):
                continue
            started = time.perf_counter()
            loop = dict(LOOP_PROBES.get(name, {}))
            members = int(loop.pop("ensemble", 1))
            trained = [train_in_process(d, size, True, members * seed + k, build, **loop,
                                        **flags) for k in range(members)]
            model = trained[0][1] if members == 1 else Averaged([m for _, m in trained])
            runs.append({"seed": seed, "seconds": time.perf_counter() - started,
                         "epochs_run": len(trained[0][0]), **test_numbers(model, d)})
            save()


class Averaged:
    """Models called as one: the mean of their probabilities (LOOP_PROBES' ensemble)."""

    def __init__(self, models: list[Any]) -> None:
        self.models = models
        self.output_shape = models[0].output_shape

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        return np.mean([np.asarray(m(x, training=training)) for m in self.models], axis=0)


# ------------------------------------------------------------------------------- 3 seeds


def report_numbers(lake: Path, run_id: str) -> dict[str, Any]:
    """The pneumonia label's test numbers from a committed report, plus ECE of the raw
    (uncalibrated) scores recomputed from the committed predictions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medray.workers.metrics import calibration, threshold_metrics

    base = lake / "runs" / run_id
    per = {r["label"]: r for r in pq.read_table(base / "report" / "per_label_metrics.parquet")
           .to_pylist()}["pneumonia"]
    ops = [r for r in pq.read_table(base / "report" / "operating_points.parquet").to_pylist()
           if r["label"] == "pneumonia" and r["primary"]]
    marker = json.loads((base / "_COMMITTED.json").read_text())
    # a shard with no row of the split has an empty file without raw_score_ columns
    preds = pa.concat_tables([pq.read_table(base / f) for f in marker["files"]],
                             promote_options="default")
    y = np.array(["pneumonia" in t for t in preds.column("true_labels").to_pylist()])
    raw = preds.column("raw_score_pneumonia").to_numpy().astype(np.float64)
    cal = preds.column("score_pneumonia").to_numpy().astype(np.float64)
    # an oracle, for the diagnosis only: the Youden point chosen on the test split itself says
    # whether the model can separate the test classes at 0.85/0.85, or whether the threshold
    # chosen on validation is what does not carry over
    best = max((threshold_metrics(y, cal, t) for t in np.unique(cal)),
               key=lambda m: m["sensitivity"] + m["specificity"])
    return {"oracle_sensitivity": best["sensitivity"],
            "oracle_specificity": best["specificity"],
            "auroc": per["auroc"], "auroc_lo": per["auroc_lo"], "auroc_hi": per["auroc_hi"],
            "ece": per["ece"], "ece_lo": per["ece_lo"], "ece_hi": per["ece_hi"],
            "ece_raw": calibration(y, raw)["ece"], "threshold": ops[0]["threshold"],
            "mean_score": per["mean_score"], "prevalence": per["prevalence"],
            "sensitivity": ops[0]["sensitivity"], "specificity": ops[0]["specificity"]}


def part_seeds(env: dict[str, str], lake: Path, out: dict[str, Any], seeds: list[int],
               save: Any) -> None:
    todo = [s for s in seeds if str(s) not in out.get("seeds", {})]
    if not todo:
        return
    medray(env, "stage", str(DATA), "--dataset", "pneumonia", "--image-size", "28",
           "--label-names", "normal,pneumonia", "--lake", str(lake))
    for seed in todo:
        trained, train_wall = medray(env, "train", "--dataset", "pneumonia", "--model",
                                     f"q{seed}", "--seed", str(seed), "--lake", str(lake))
        card = json.loads((lake / "models" / f"q{seed}" / "1" / "card.json").read_text())
        scored, score_wall = medray(env, "score", "--dataset", "pneumonia", "--model",
                                    f"q{seed}:1", "--split", "test", "--lake", str(lake))
        _, report_wall = medray(env, "report", scored["run_id"], "--lake", str(lake))
        out.setdefault("seeds", {})[str(seed)] = {
            **report_numbers(lake, scored["run_id"]), "train_s": train_wall,
            "score_s": score_wall, "report_s": report_wall,
            "best_epoch": card["metrics"]["best_epoch"],
            "epochs_run": card["metrics"]["epochs_run"],
            "temperature": card["calibration"]["temperature"]["pneumonia"],
            "form": (card["calibration"].get("form") or {}).get("pneumonia"),
            "recipe": card["hyperparameters"].get("augment_recipe"),
            "bias": (card["calibration"].get("bias") or {}).get("pneumonia"),
            "val_ece_before": trained["val_ece_before"],
            "val_ece_after": trained["val_ece_after"], "history": card["metrics"]["history"]}
        print(f"seed {seed}: {json.dumps(out['seeds'][str(seed)], default=str)[:600]}",
              flush=True)
        save()


# -------------------------------------------------------------------------- folder X-rays


def xray_folder(root: Path, size: int) -> Path:
    """root/<split>/<label>/<n>.png: every PneumoniaMNIST image, resized."""
    from PIL import Image

    d = resized(size)
    for split in ("train", "val", "test"):
        for i, (x, y) in enumerate(zip(d[f"{split}_x"], d[f"{split}_y"], strict=True)):
            folder = root / split / LABELS[int(y[1])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[..., 0]).save(folder / f"{split}{i:05d}.png")
    return root


def part_xray(env: dict[str, str], lake: Path, work: Path, out: dict[str, Any],
              save: Any) -> None:
    staged: dict[int, float] = {}
    for name, size, flags in XRAY_RUNS:
        if XRAY_ONLY and f"{name}@{size}" not in XRAY_ONLY:
            continue
        if any((r["name"], r["size"]) == (name, size) for r in out.get("xray", [])):
            continue
        dataset = f"xray{size}"
        if size not in staged:
            src = xray_folder(work / dataset, size)
            _, staged[size] = medray(env, "stage", str(src), "--dataset", dataset,
                                     "--image-size", str(size), "--lake", str(lake))
        model = f"x{size}{''.join(f.strip('-')[:3] for f in flags)}"
        trained, wall = medray(env, "train", "--dataset", dataset, "--model", model, *flags,
                               "--lake", str(lake))
        card = json.loads((lake / "models" / model / "1" / "card.json").read_text())
        scored, _ = medray(env, "score", "--dataset", dataset, "--model", f"{model}:1",
                           "--split", "test", "--lake", str(lake))
        medray(env, "report", scored["run_id"], "--lake", str(lake))
        out.setdefault("xray", []).append({
            "name": name, "size": size, "flags": " ".join(flags), "train_s": wall,
            "recipe": card["hyperparameters"].get("augment_recipe"),
            "form": (card["calibration"].get("form") or {}).get("pneumonia"),
            "stage_s": staged[size], "epochs_run": card["metrics"]["epochs_run"],
            "best_epoch": card["metrics"]["best_epoch"],
            "epoch_s": float(np.median([h["seconds"] for h in card["metrics"]["history"]])),
            "history": card["metrics"]["history"], **report_numbers(lake, scored["run_id"])})
        print(f"xray {name} {size}: {json.dumps(out['xray'][-1], default=str)[:600]}",
              flush=True)
        save()


# ------------------------------------------------------------------------------- writing


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else \
        f"{v:.{digits}f}"


def _epochs_table(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[str]:
    lines = ["| epoch | train loss (old loop) | val loss (old loop) | train loss (fixed) | "
             "val loss (fixed) | val AUROC (old / fixed) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for b, a in zip(before, after, strict=True):
        lines.append(f"| {b['epoch']} | {_f(b['loss'])} | {_f(b['val_loss'])} | "
                     f"{_f(a['loss'])} | {_f(a['val_loss'])} | {_f(b['val_mean_auroc'])} / "
                     f"{_f(a['val_mean_auroc'])} |")
    return lines


def _shift_note(rows: list[dict[str, Any]]) -> list[str]:
    """What the seeds say about validation against test: the calibration and the threshold
    are fitted on validation; this compares what they promise there with what test shows."""
    d = np.load(DATA)
    val_prev = float(d["val_labels"].mean())
    test_prev = float(d["test_labels"].mean())
    val_ece = [r["val_ece_after"]["pneumonia"] if isinstance(r["val_ece_after"], dict)
               else r["val_ece_after"] for r in rows]
    oracle = [r for r in rows if "oracle_sensitivity" in r]
    mean_score = float(np.median([r["mean_score"] for r in rows]))
    calls = ("over-calls" if mean_score > test_prev + 0.02 else
             "under-calls" if mean_score < test_prev - 0.02 else "matches")
    test_ece = float(np.median([r["ece"] for r in rows]))
    text = (f"Validation against test: validation ECE after calibration {_spread(val_ece)}, "
            f"test ECE {_spread([r['ece'] for r in rows])} "
            f"({'within' if test_ece <= GOALS['ece'] else 'outside'} the goal of "
            f"{GOALS['ece']}). PneumoniaMNIST's test split is not drawn like its validation "
            f"split: {test_prev:.3f} pneumonia against {val_prev:.3f}. The mean calibrated "
            f"test score is {_spread([r['mean_score'] for r in rows])}, so the model {calls} "
            f"pneumonia's rate on test; the threshold chosen on validation gives specificity "
            f"{_spread([r['specificity'] for r in rows])} there.")
    if oracle:
        text += (" At the Youden point of the test split itself (an oracle for the diagnosis, "
                 "not a method) sensitivity is "
                 f"{_spread([r['oracle_sensitivity'] for r in oracle])} and specificity "
                 f"{_spread([r['oracle_specificity'] for r in oracle])}: the model separates "
                 "the test classes, and the threshold chosen on validation is what does not "
                 "carry over.")
    return [text, ""]


def _staged_test() -> str:
    """The test split as staging keeps it: one copy of byte-identical images, the first in
    listing order (train, val, test)."""
    d = np.load(DATA)
    seen: set[bytes] = set()
    kept = 0
    for split in ("train", "val", "test"):
        for x in d[f"{split}_images"]:
            digest = x.tobytes()
            kept += split == "test" and digest not in seen
            seen.add(digest)
    total = len(d["test_images"])
    return f"{kept} of the .npz's {total} (byte-identical repeats of earlier images dropped)" \
        if kept != total else str(total)


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _spread(values: list[float]) -> str:
    return f"{np.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def _variants_table(args: argparse.Namespace, variants: dict[str, list[dict[str, Any]]],
                   size: int) -> list[str]:
    lines = ["Defaults and variants tried (in-process, medray's training loop with the fix, "
             "early stopping, calibration and the Youden point on validation; seeds "
             f"{args.seeds}; PneumoniaMNIST {size} px"
             f"{', resized from 28 px' if size != 28 else ''}, test split); median (min-max) "
             "over seeds. Calibration with the temperature alone (`--calibration-form "
             "temperature`), and, for the same models, the class-balanced bias "
             "(`--calibration-form temperature+balanced-bias`, the default after a recipe "
             "that crops 0.15 or more, `strong`); for two classes every form "
             "is monotone in the raw score, so sensitivity and specificity are the "
             "same. \"defaults\" is `--augment-recipe auto`: `strong` below 128 px, `light` "
             "from 128 px:", "",
             "| settings | test AUROC | test ECE raw | val ECE calibrated | test ECE "
             "calibrated | sensitivity | specificity | mean calibrated score (test "
             "prevalence 0.625) | balanced bias: val ECE | balanced bias: test ECE | "
             "s per run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, runs in variants.items():
        def col(key: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [r[key] for r in runs if key in r]
            return _spread(values) if values else "-"
        lines.append(f"| {name} | {col('auroc')} | {col('ece_raw')} | {col('val_ece')} | "
                    f"{col('ece')} | {col('sensitivity')} | {col('specificity')} | "
                    f"{col('mean_score')} | {col('val_ece_balanced')} | "
                    f"{col('ece_balanced')} | "
                    f"{np.median([r['seconds'] for r in runs]):.0f} |")
    lines.append("")
    return lines


def report(args: argparse.Namespace, out: dict[str, Any], failed: dict[str, str],
           load: list[float]) -> str:
    cmd = ".venv/bin/python bench/bench_quality.py" + (
        f" --only {args.only}" if args.only != ",".join(PARTS) else "")
    if args.results:
        done = [k for k in PARTS if any(key.startswith(k) for key in out)]
        runs = sorted({f"{r['name']}@{r['size']}" for r in out.get("xray", [])})
        cmd = (".venv/bin/python bench/bench_quality.py --only PART --results FILE --no-write"
               f"` once for each of {', '.join(done)}"
               + (f" (xray: `--xray-runs {','.join(runs)}`)" if runs else "")
               + ", one lock sitting each on this shared machine, then `--only none --results "
               "FILE` to write this section; all at once: `.venv/bin/python "
               "bench/bench_quality.py")
    lines = ["## Quality", "",
             f"Command: `{cmd}` (bench/bench_quality.py). Machine: {platform.machine()}, "
             f"{os.cpu_count()} CPU cores, {_memory_gib():.0f} GiB, no GPU; local Ray cluster "
             f"with {args.cpus} CPUs, "
             f"local-folder lake; 1-minute load average {min(load or [0]):.1f}-"
             f"{max(load or [0]):.1f} (shared machine: times are upper bounds).", "",
             "Data: PneumoniaMNIST from MedMNIST v2 (Yang et al., Scientific Data 2023, CC BY "
             "4.0), derived from Kermany et al., Cell 2018 (`../shared/data/pneumoniamnist.npz`:"
             " 3,882 train images, 90% pneumonia; MedMNIST's official validation, 524, 74%, and "
             "test, 624, 62.5%).", ""]
    for part, why in failed.items():
        lines += [f"Part `{part}` did not finish: {why}.", ""]
    for size in (28, 128):
        d = out.get(f"defect{size}")
        if d:
            lines += [f"Training defect at {size} px (PneumoniaMNIST"
                      f"{', resized from 28 px' if size != 28 else ''}; TrainSpec defaults, "
                      "seed 0, in-process with medray's workers code). Old loop: inference "
                      "with BatchNorm moving averages; fixed: statistics re-estimated on the "
                      "epoch's last 1,024 training images before validating. Validation loss "
                      "is the class-weighted loss the loop logs:", "",
                      *_epochs_table(d["before"], d["after"]), ""]
    for size in sorted(int(k.partition("@")[2] or 28) for k in out
                       if k.startswith("variants")):
        lines += _variants_table(args, out[variants_key(size)], size)
    seeds = out.get("seeds")
    if seeds:
        rows = list(seeds.values())
        lines += ["Defaults on PneumoniaMNIST through the CLI (`medray stage "
                  "../shared/data/pneumoniamnist.npz --dataset pneumonia --image-size 28 "
                  "--label-names normal,pneumonia`; `medray train --dataset pneumonia --model "
                  "qS --seed S`; `medray score ... --split test`; `medray report RUN`). Test "
                  f"split: {_staged_test()} images; 95% intervals resample images (no "
                  "patient key in the .npz); sensitivity and specificity at the Youden point "
                  "chosen on validation's calibrated scores:", "",
                  "| seed | test AUROC (CI) | test ECE raw | test ECE calibrated (CI) | T | "
                  "mean score / prevalence | threshold | sensitivity | specificity | "
                  "Youden on test itself (oracle) | best / run epochs | train s | score s | "
                  "report s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | "
                  "--- | --- |"]
        for seed, r in seeds.items():
            lines.append(
                f"| {seed} | {_f(r['auroc'])} ({_f(r['auroc_lo'])}-{_f(r['auroc_hi'])}) | "
                f"{_f(r['ece_raw'])} | {_f(r['ece'])} ({_f(r['ece_lo'])}-{_f(r['ece_hi'])}) | "
                f"{_f(r['temperature'], 2)} | {_f(r['mean_score'])} / {_f(r['prevalence'])} | "
                f"{_f(r['threshold'], 4)} | "
                f"{_f(r['sensitivity'])} | {_f(r['specificity'])} | "
                f"{_f(r.get('oracle_sensitivity'))} / {_f(r.get('oracle_specificity'))} | "
                f"{r['best_epoch']} / "
                f"{r['epochs_run']} | {r['train_s']:.0f} | {r['score_s']:.0f} | "
                f"{r['report_s']:.0f} |")
        auroc = [r["auroc"] for r in rows]
        ece = [r["ece"] for r in rows]
        sens = [r["sensitivity"] for r in rows]
        spec = [r["specificity"] for r in rows]
        lines += ["", "| goal (issue 15) | median (min-max) over seeds | |",
                  "| --- | --- | --- |",
                  f"| test AUROC >= {GOALS['auroc']} | {_spread(auroc)} | "
                  f"{'met' if np.median(auroc) >= GOALS['auroc'] else 'not met'} |",
                  f"| test ECE after calibration <= {GOALS['ece']} | {_spread(ece)} | "
                  f"{'met' if np.median(ece) <= GOALS['ece'] else 'not met'} |",
                  f"| sensitivity at the Youden point >= {GOALS['rate']} | {_spread(sens)} | "
                  f"{'met' if np.median(sens) >= GOALS['rate'] else 'not met'} |",
                  f"| specificity at the Youden point >= {GOALS['rate']} | {_spread(spec)} | "
                  f"{'met' if np.median(spec) >= GOALS['rate'] else 'not met'} |", ""]
        first = rows[0]["history"]
        lines += ["Per epoch through `medray train` (seed 0, from the card's history): "
                  + "; ".join(f"{h['epoch']}: {_f(h['loss'])} / {_f(h.get('val_loss'))}"
                              for h in first) + " (train / validation loss).", ""]
        lines += _shift_note(rows)
    xray = out.get("xray")
    if xray:
        lines += ["Folder of X-rays (`root/<split>/<label>/*.png`, all 5,030 PneumoniaMNIST "
                  "images resized, official splits: 3,882 train), staged and trained through "
                  f"the CLI; test split {_staged_test()} images:", "",
                  "| settings | px | stage s | train s | epochs (best / run) | median epoch s "
                  "| test AUROC | test ECE | sensitivity | specificity |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in xray:
            lines.append(f"| {r['name']} | {r['size']} | {r['stage_s']:.0f} | "
                         f"{r['train_s']:.0f} | {r['best_epoch']} / {r['epochs_run']} | "
                         f"{r['epoch_s']:.1f} | {_f(r['auroc'])} | {_f(r['ece'])} | "
                         f"{_f(r['sensitivity'])} | {_f(r['specificity'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--only", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--xray-runs", default="",
                        help="only these folder-of-X-ray runs, NAME@SIZE comma-separated "
                        "(e.g. defaults@128); default all")
    parser.add_argument("--variants", default="",
                        help="only these in-process variants, by name, ';'-separated")
    parser.add_argument("--variant-size", type=int, default=28,
                        help="px of the in-process variants (PneumoniaMNIST resized)")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--results", type=Path, default=None,
                        help="JSON file of earlier parts' results: merged, then rewritten (run "
                        "the parts in separate sittings, write the section once)")
    args = parser.parse_args()
    parts = [p for p in PARTS if p in args.only.split(",")]
    VARIANTS_ONLY.extend(v.strip() for v in args.variants.split(";") if v.strip())
    XRAY_ONLY.extend(r.strip() for r in args.xray_runs.split(",") if r.strip())
    work = Path(tempfile.mkdtemp(prefix="medray-bench-quality-"))
    home, lake = work / "home", work / "lake"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k not in ("MEDRAY_LAKE", "RAY_ADDRESS",
                                                      "MEDRAY_FAULT")}
    env.update({"MEDRAY_HOME": str(home), "AWS_EC2_METADATA_DISABLED": "true",
                "TF_CPP_MIN_LOG_LEVEL": "2"})
    os.environ.update({"MEDRAY_HOME": str(home)})
    from medray.cluster.infra import ray_local

    out: dict[str, Any] = {}
    if args.results and args.results.exists():
        out.update(json.loads(args.results.read_text()))
    failed: dict[str, str] = {}
    load: list[float] = list(out.pop("_load", []))
    results = args.results or work.parent / f"{work.name}.json"

    def save() -> None:  # after every run: a killed sitting loses only the run it was in
        results.write_text(json.dumps({**out, "_load": load}, default=str))

    seeds = [int(s) for s in args.seeds.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still saves and stops Ray
    try:
        if "defect" in parts:
            load.append(os.getloadavg()[0])
            part_defect(out, save)
        if "variants" in parts:
            load.append(os.getloadavg()[0])
            part_variants(out, seeds, save, args.variant_size)
        if {"seeds", "xray"} & set(parts):
            ray_local.up(num_cpus=args.cpus, dashboard_port=None)
        for part in ("seeds", "xray"):
            if part not in parts:
                continue
            load.append(os.getloadavg()[0])
            try:
                if part == "seeds":
                    part_seeds(env, lake, out, seeds, save)
                else:
                    part_xray(env, lake, work, out, save)
            except RunFailed as exc:
                failed[part] = str(exc)
            load.append(os.getloadavg()[0])
    finally:
        if {"seeds", "xray"} & set(parts):
            ray_local.down()
        save()
        shutil.rmtree(work, ignore_errors=True)
    text = report(args, out, failed, load)
    print(text)
    if not args.no_write:
        write_section("Quality", text)


if __name__ == "__main__":
    main()
