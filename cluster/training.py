"""The train job: Ray Train's TensorflowTrainer with MultiWorkerMirroredStrategy.

Each worker streams its share of the staged shards (Ray Data streaming_split -> numpy
batches); checkpoints (weights + optimizer state + progress) go to the lake every epoch, so
``--resume`` continues from the last one. The best epoch (mean validation AUROC) becomes the
registered model version with its card.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from medray.cluster import catalog, registry
from medray.cluster.lake import Lake
from medray.workers.errors import ConfigError, InputError
from medray.workers.models import ModelCard
from medray.workers.shards import labels_to_targets

log = logging.getLogger(__name__)
COLUMNS = ["pixels", "labels", "split", "height", "width", "channels"]


class TrainReader:
    """One shard -> numpy batches {"x": uint8 (n,H,W,C), "y": float32 (n,L)} of one split."""

    def __init__(self, lake_uri: str, split: str, labels: list[str], multi_label: bool) -> None:
        self.lake = Lake(lake_uri)
        self.split, self.labels, self.multi_label = split, labels, multi_label

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        for path in batch["path"]:
            yield from read_split(self.lake, str(path), self.split, self.labels, self.multi_label)


def read_split(lake: Lake, path: str, split: str, labels: list[str], multi_label: bool,
               rows: int = 512) -> Iterator[dict[str, np.ndarray]]:
    table = lake.read_parquet(path, columns=COLUMNS)
    table = table.filter(pc.equal(table.column("split"), split))
    for start in range(0, table.num_rows, rows):
        part = table.slice(start, rows)
        h, w, c = (part.column(k)[0].as_py() for k in ("height", "width", "channels"))
        blob = b"".join(part.column("pixels").to_pylist())
        x = np.frombuffer(blob, np.uint8).reshape(part.num_rows, h, w, c)
        y = labels_to_targets(part.column("labels").to_pylist(), labels, multi_label)
        yield {"x": x, "y": y}


def _arrays(lake: Lake, shards: list[str], split: str, labels: list[str], multi: bool
            ) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for path in shards:
        for b in read_split(lake, path, split, labels, multi):
            xs.append(b["x"])
            ys.append(b["y"])
    if not xs:
        return np.zeros((0,)), np.zeros((0, len(labels)), np.float32)
    return np.concatenate(xs), np.concatenate(ys)


def _save_checkpoint(lake: Lake, ckpt_dir: str, model: Any, optimizer: Any,
                     state: dict[str, Any], best: bool) -> None:
    from medray.workers.training import optimizer_state

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.weights.h5"
        model.save_weights(str(weights))
        data = weights.read_bytes()
    opt = io.BytesIO()
    np.savez(opt, **optimizer_state(optimizer))
    epoch_dir = f"{ckpt_dir}/epoch-{state['epoch']:04d}"
    lake.write_bytes(f"{epoch_dir}/model.weights.h5", data)
    lake.write_bytes(f"{epoch_dir}/optimizer.npz", opt.getvalue())
    if best:
        lake.write_bytes(f"{ckpt_dir}/best.weights.h5", data)
    lake.write_json(f"{epoch_dir}/state.json", state)  # written last: the checkpoint's commit
    lake.write_json(f"{ckpt_dir}/latest.json", {"epoch": state["epoch"], "dir": epoch_dir})


def _load_weights(model: Any, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.weights.h5"
        path.write_bytes(data)
        model.load_weights(str(path))


def _initial_weights(lake: Lake, model: Any, weights: str) -> None:
    """--weights: none | imagenet (applied at build) | PATH(.keras|.weights.h5) | MODEL:VERSION"""
    if weights in ("none", "imagenet"):
        return
    if weights.endswith((".keras", ".weights.h5")):
        data = Path(weights).read_bytes() if Path(weights).exists() else lake.read_bytes(weights)
        if weights.endswith(".keras"):
            import keras

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "init.keras"
                path.write_bytes(data)
                source = keras.saving.load_model(str(path), compile=False, safe_mode=True)
            model.set_weights(source.get_weights())
        else:
            _load_weights(model, data)
        return
    card = registry.resolve(lake, weights)
    source_path = registry.fetch(lake, card)
    import keras

    source = keras.saving.load_model(source_path, compile=False, safe_mode=True)
    model.set_weights(source.get_weights())


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import keras
    import ray.train
    import tensorflow as tf

    from medray.workers import training as tr
    from medray.workers.models import build_model, configure_tensorflow

    configure_tensorflow()
    lake = Lake(config["lake_uri"])
    spec, labels, multi = config["spec"], config["labels"], config["multi_label"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    local_batch = max(1, spec["batch_size"] // world)
    global_batch = local_batch * world
    with strategy.scope():
        model = build_model(spec["arch"], config["image_size"], config["channels"], len(labels),
                            multi, weights=spec["weights"], seed=spec["seed"])
        optimizer = keras.optimizers.Adam(learning_rate=spec["learning_rate"])
        _initial_weights(lake, model, spec["weights"])
        if spec["mode"] == "head":
            for layer in model.layers:
                if isinstance(layer, keras.Model):
                    layer.trainable = False
        pos_w, neg_w = config["class_weights"]
        loss_fn = tr.make_loss(multi, None if pos_w is None else np.array(pos_w, np.float32),
                               None if neg_w is None else np.array(neg_w, np.float32))
        train_step = tr.make_train_step(strategy, model, optimizer, loss_fn, global_batch)

    ckpt_dir = config["ckpt_dir"]
    state: dict[str, Any] = {"epoch": 0, "best_auroc": -1.0, "best_epoch": 0, "history": [],
                             "bad_epochs": 0}
    latest = lake.read_json_or_none(f"{ckpt_dir}/latest.json") if spec["resume"] else None
    if latest:
        state = lake.read_json(f"{latest['dir']}/state.json")
        _load_weights(model, lake.read_bytes(f"{latest['dir']}/model.weights.h5"))
        with np.load(io.BytesIO(lake.read_bytes(f"{latest['dir']}/optimizer.npz"))) as opt:
            tr.restore_optimizer(optimizer, model, {k: opt[k] for k in opt.files})
        if rank == 0:
            print(f"resumed from epoch {state['epoch']}", flush=True)  # noqa: T201

    val_x, val_y = _arrays(lake, config["shards"], config["val_split"], labels, multi)
    shard = ray.train.get_dataset_shard("train")
    tf.random.set_seed(spec["seed"] + state["epoch"])
    for epoch in range(state["epoch"] + 1, spec["epochs"] + 1):
        t0 = time.monotonic()
        seen, losses = 0, []
        for batch in shard.iter_batches(batch_size=local_batch, batch_format="numpy",
                                        drop_last=True, local_shuffle_buffer_size=4 * local_batch,
                                        local_shuffle_seed=spec["seed"] + epoch):
            losses.append(float(train_step(batch["x"], batch["y"])))
            seen += len(batch["x"]) * world
        seconds = time.monotonic() - t0
        if len(val_x):
            scores = tr.predict(model, (val_x[i:i + 256] for i in range(0, len(val_x), 256)))
            ev = tr.evaluate(val_y, scores, labels)
        else:
            ev = {"auroc": {}, "mean_auroc": float("nan")}
        mean_auc = ev["mean_auroc"]
        improved = bool(np.isfinite(mean_auc) and mean_auc > state["best_auroc"]) or (
            not np.isfinite(mean_auc) and epoch == spec["epochs"])
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"),
                  "val_mean_auroc": mean_auc, "val_auroc": ev["auroc"], "images": seen,
                  "images_per_s": seen / seconds if seconds else 0.0, "seconds": seconds}
        state["history"].append(record)
        state["epoch"] = epoch
        if improved:
            state["best_auroc"] = float(mean_auc) if np.isfinite(mean_auc) else state["best_auroc"]
            state["best_epoch"] = epoch
            state["bad_epochs"] = 0
        else:
            state["bad_epochs"] += 1
        if rank == 0:
            _save_checkpoint(lake, ckpt_dir, model, optimizer, state, improved)
            print(f"epoch {epoch}/{spec['epochs']}: loss {record['loss']:.4f}, "  # noqa: T201
                  f"val mean AUROC {mean_auc:.4f}, {record['images_per_s']:.0f} img/s, "
                  f"{seconds:.1f}s", flush=True)
        ray.train.report({k: v for k, v in record.items() if k != "val_auroc"})
        if state["bad_epochs"] >= spec["patience"]:
            if rank == 0:
                print(f"early stop: no val AUROC gain in {spec['patience']} epochs",  # noqa: T201
                      flush=True)
            break
        if config.get("fault_after_epoch") == epoch and rank == 0:
            os._exit(17)  # fault injection for resume tests (MEDRAY_FAULT=train_exit_after_epoch:N)

    if rank == 0:
        _finalise(lake, config, model, labels, val_x, val_y, state)


def _finalise(lake: Lake, config: dict[str, Any], model: Any, labels: list[str],
              val_x: np.ndarray, val_y: np.ndarray, state: dict[str, Any]) -> None:
    """Best weights -> thresholds on validation -> final .keras + draft card in the run dir."""
    from medray.workers import training as tr

    ckpt_dir = config["ckpt_dir"]
    if lake.exists(f"{ckpt_dir}/best.weights.h5"):
        _load_weights(model, lake.read_bytes(f"{ckpt_dir}/best.weights.h5"))
    thresholds: dict[str, float] = {}
    if len(val_x):
        scores = tr.predict(model, (val_x[i:i + 256] for i in range(0, len(val_x), 256)))
        thresholds = tr.choose_thresholds(val_y, scores, labels)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        model.save(str(path))
        lake.write_bytes(f"{config['run_dir']}/final/model.keras", path.read_bytes())
    lake.write_json(f"{config['run_dir']}/final/result.json",
                    {"thresholds": thresholds, "state": state})


def run(spec: dict[str, Any], lake: Lake, job_id: str) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    started = time.monotonic()
    dataset, dversion, manifest = catalog.resolve(lake, spec["dataset"])
    labels, multi = list(manifest["labels"]), bool(manifest["multi_label"])
    if not labels:
        raise ConfigError(f"dataset {dataset}:{dversion} has no labels to train on")
    counts = manifest["counts"]
    if "train" not in counts:
        raise ConfigError(f"dataset {dataset}:{dversion} has no train split")
    val_split = "val" if "val" in counts else "test"
    train_total = sum(1 for _ in ())  # placeholder for mypy; real total below
    train_counts = counts["train"]
    train_total = _split_images(lake, manifest, "train")
    if spec["gpus_per_worker"] and ray.cluster_resources().get("GPU", 0) < spec["gpus_per_worker"]:
        raise ConfigError("--gpus-per-worker asks for GPUs but the cluster has none")
    if spec["class_weights"] == "auto":
        pos_w, neg_w = _weights(train_counts, labels, train_total, multi)
    else:
        pos_w = neg_w = None
    train_id = spec.get("run_id") or (f"{spec['model']}-{dataset}" if spec["resume"]
                                      else f"{spec['model']}-{uuid.uuid4().hex[:8]}")
    run_dir = f"models/{spec['model']}/_training/{train_id}"
    if spec["resume"] and not lake.exists(f"{run_dir}/latest.json") and not lake.exists(
            f"{run_dir}/checkpoints/latest.json"):
        log.info("[%s] --resume: no checkpoint under %s yet, starting fresh", job_id, run_dir)
    lake.write_json(f"{run_dir}/spec.json", {**spec, "dataset_version": dversion})
    fault = os.environ.get("MEDRAY_FAULT", "")
    config = {
        "spec": spec, "lake_uri": lake.uri, "labels": labels, "multi_label": multi,
        "image_size": manifest["image_size"], "channels": manifest["channels"],
        "shards": [s["path"] for s in manifest["shards"]], "val_split": val_split,
        "ckpt_dir": f"{run_dir}/checkpoints", "run_dir": run_dir,
        "class_weights": (None if pos_w is None else pos_w.tolist(),
                          None if neg_w is None else neg_w.tolist()),
        "fault_after_epoch": int(fault.split(":")[1]) if fault.startswith(
            "train_exit_after_epoch:") else None,
    }
    train_ds = ray.data.from_items([{"path": s["path"]} for s in manifest["shards"]],
                                   override_num_blocks=len(manifest["shards"])).map_batches(
        TrainReader, fn_constructor_args=(lake.uri, "train", labels, multi), batch_size=1,
        batch_format="numpy", concurrency=1, num_cpus=0.5)
    trainer = TensorflowTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=spec["workers"], use_gpu=bool(spec["gpus_per_worker"]),
            resources_per_worker={"CPU": spec["cpus_per_worker"],
                                  **({"GPU": spec["gpus_per_worker"]}
                                     if spec["gpus_per_worker"] else {})}),
        run_config=RunConfig(name=f"medray-{train_id}",
                             storage_path=str(Path(tempfile.gettempdir()) / "medray-train")),
        datasets={"train": train_ds},
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    final = lake.read_json_or_none(f"{run_dir}/final/result.json")
    if final is None:
        raise InputError("training ended without a final model (see the worker logs)")
    state = final["state"]
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]),
                state["history"][-1] if state["history"] else {})
    card = ModelCard(
        name=spec["model"], labels=labels, multi_label=multi,
        input_size=manifest["image_size"], channels=manifest["channels"], arch=spec["arch"],
        thresholds=final["thresholds"], dataset=dataset, dataset_version=dversion,
        weights=spec["weights"],
        hyperparameters={k: spec[k] for k in ("epochs", "batch_size", "learning_rate", "workers",
                                              "mode", "augment", "class_weights", "seed",
                                              "patience")},
        metrics={"val_split": val_split, "best_epoch": state["best_epoch"],
                 "val_mean_auroc": best.get("val_mean_auroc"),
                 "val_auroc": best.get("val_auroc"), "history": state["history"]},
        training_seconds=round(time.monotonic() - started, 1),
        code_version=_code_version(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(lake.read_bytes(f"{run_dir}/final/model.keras"))
        card = registry.register(lake, str(path), card)
    log.info("[%s] registered %s:%s (val mean AUROC %s)", job_id, card.name, card.version,
             card.metrics.get("val_mean_auroc"))
    return {"model": card.name, "version": card.version, "metrics": {
        "val_mean_auroc": card.metrics.get("val_mean_auroc"), "val_auroc":
        card.metrics.get("val_auroc"), "best_epoch": state["best_epoch"]},
        "uri": lake.full_uri(f"models/{card.name}/{card.version}"), "training_id": train_id}


def _split_images(lake: Lake, manifest: dict[str, Any], split: str) -> int:
    total = 0
    for shard in manifest["shards"]:
        col = lake.read_parquet(shard["path"], columns=["split"]).column(0)
        total += int(pc.sum(pc.equal(col, split)).as_py() or 0)
    return total


def _weights(counts: dict[str, int], labels: list[str], total: int, multi: bool
             ) -> tuple[np.ndarray, np.ndarray]:
    from medray.workers.training import class_weights

    return class_weights(counts, labels, total, multi)


def _code_version() -> str:
    try:
        from importlib.metadata import version

        return f"medray {version('medray')}"
    except Exception:  # noqa: BLE001 - a card without a version is still a card
        return "medray (unknown)"


def card_json(card: ModelCard) -> str:
    return json.dumps(card.__dict__)
