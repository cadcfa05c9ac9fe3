"""What runs in the Ray Train workers: the distributed training loop.

Every worker builds the same model under ``MultiWorkerMirroredStrategy``, restores the last
checkpoint if there is one and runs exactly ``plan.steps`` steps per epoch on its share of the
train split. Rank 0 alone validates, checkpoints, writes TensorBoard events and decides whether
to go on; the decision is broadcast, so every worker stops at the same epoch. Before it
validates, rank 0 re-estimates BatchNorm's inference statistics on its last training images of
the epoch (``training.precise_batchnorm``), so validation, checkpoints and the registered model
see the network that was trained, not moving averages that lag it. At the end rank 0 writes the
best epoch's full model and the thresholds chosen on validation to ``final/``.
Every rank keeps its rank file current (the attempts it began, the steps of each epoch), so a
worker group that Ray Train restarts after losing a node leaves a record of the restart.
Progress lines go to the worker's stdout, which Ray streams into the job log and the CLI.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from medray.cluster.infra import events, faults, logs
from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.cluster.train import checkpoints, data, restarts
from medray.cluster.train.plan import PLAN, TrainPlan
from medray.cluster.train.weights import initial_model
from medray.workers import training as tr
from medray.workers.jsonsafe import json_safe

log = logging.getLogger(__name__)
PROGRESS_LINES = 4  # progress lines per epoch, besides the epoch line
PROGRESS_EVERY_S = 30.0  # and at least this often


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker; ``config`` is ``{PLAN: TrainPlan}``."""
    import ray.train

    from medray.workers.models import configure_tensorflow, import_tensorflow

    plan: TrainPlan = config[PLAN]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # rank 0 reads the validation split beside its TensorFlow import and first epoch
    val = data.SplitRows(list(plan.val_files), data.reader_for(plan.cached), plan.lake_uri,
                         plan.val_split, list(plan.data.labels), plan.data.multi_label) \
        if rank == 0 else None
    import_tensorflow()  # without scikit-learn: the worker's one TensorFlow import
    import keras
    import tensorflow as tf
    from ray.train.collective import broadcast_from_rank_zero

    logs.configure()
    _quiet_tensorflow()
    configure_tensorflow()
    lake = Lake(plan.lake_uri)
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    batching = tr.plan_batches(plan.train_rows, plan.spec.batch_size, world,
                              tr.local_replicas(strategy))
    with strategy.scope():
        model, note = _build_trainable(lake, plan)
        optimizer = keras.optimizers.Adam(learning_rate=plan.spec.learning_rate)
        optimizer.build(model.trainable_variables)
        # a fresh training id has no checkpoint, so one here is --resume (or a restarted worker)
        restored = checkpoints.restore(lake, plan, model, optimizer)
        state = restored if restored is not None else tr.new_state()
        pos_w, neg_w = plan.class_weights or (None, None)
        loss_fn = tr.make_loss(plan.data.multi_label,
                               None if pos_w is None else np.array(pos_w, np.float32),
                               None if neg_w is None else np.array(neg_w, np.float32))
        train_step = tr.make_train_step(strategy, model, optimizer, loss_fn, batching.global_batch)
    record = restarts.begin_attempt(lake, plan.spec.model, plan.train_id, plan.job_id, rank,
                                    int(state["epoch"]), world=world, plan=asdict(batching))
    if rank == 0 and len(record["attempts"]) > 1:
        log.warning("training %s: the workers restarted (attempt %d of job %s), resuming from "
                    "the checkpoint of epoch %d", plan.train_id, len(record["attempts"]),
                    plan.job_id, state["epoch"])
    if rank == 0:
        log.info("training %s: %s on %d images, %d worker(s) x %d images per step, %d steps "
                 "per epoch; initial weights: %s", plan.train_id, plan.spec.arch,
                 plan.train_rows, world, batching.local_batch, batching.steps, note)
        if restored is not None:
            log.info("resumed from the checkpoint of epoch %d (best epoch %d)", state["epoch"],
                     state["best_epoch"])
    board: _Board | None = None
    if val is not None:
        board = _Board(lake, layout.training_board(plan.spec.model, plan.train_id))
    shard = ray.train.get_dataset_shard("train")
    fault, delay = faults.train_exit_epoch(), faults.train_epoch_delay()
    fail = faults.train_fail_epoch()
    mine: dict[str, Any] = record["epochs"]
    epoch = int(state["epoch"])
    stop = tr.finished(state, plan.spec.epochs)  # every rank read the same checkpoint
    # rank 0 keeps its last training images of each epoch for the BatchNorm statistics
    keep = tr.BN_IMAGES if rank == 0 and tr.batchnorm_layers(model) else 0
    best: tuple[int, list[Any]] | None = None  # rank 0: (epoch, weights) of this job's best
    while not stop:
        epoch += 1
        done = _train_epoch(shard, train_step, batching, epoch, plan, rank == 0, keep)
        mine[str(epoch)] = {"steps": done["steps"], "batches": done["batches"],
                            "images": done["steps"] * batching.local_batch}
        decision: dict[str, Any] | None = None
        if board is not None and val is not None:
            decision = _close_epoch(lake, plan, val, model, optimizer, loss_fn, state, board,
                                    {**done, "epoch": epoch,
                                     "images": done["steps"] * batching.global_batch})
            if decision["improved"]:  # held in memory: the end reads no checkpoint back
                best = (epoch, model.get_weights())
        decision = broadcast_from_rank_zero(decision)  # one decision, whatever BN drift says
        ray.train.report({"epoch": epoch, "steps": done["steps"]})
        lake.write_json(layout.training_rank(plan.spec.model, plan.train_id, plan.job_id, rank),
                        record)
        if fault == epoch and rank == 0:
            log.info("MEDRAY_FAULT: exiting after epoch %d", epoch)
            faults.die()
        if fail == epoch and rank == 0:
            faults.fail_retryably(epoch)
        if delay:
            time.sleep(delay)
        stop = bool(decision["stop"])
    if val is not None:
        _finalise(lake, plan, val, model, state, best)


def _quiet_tensorflow() -> None:
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # absl ships with TensorFlow; nothing to quiet without it
        pass


def _build_trainable(lake: Lake, plan: TrainPlan) -> tuple[Any, str]:
    """(the model the optimizer updates, what it starts from): the head alone on cached
    features, else the full model (backbone frozen for --mode head)."""
    from medray.workers.models import build_head, freeze_backbone

    if plan.feature_dim is not None:
        head = build_head(plan.feature_dim, len(plan.data.labels), plan.data.multi_label,
                          seed=plan.spec.seed)
        return head, "head on cached features"
    model, note = initial_model(lake, plan.init, plan.shape, plan.augment)
    if plan.spec.mode == "head":
        freeze_backbone(model)
    return model, note


def _train_epoch(shard: Any, train_step: Any, batching: tr.BatchPlan, epoch: int, plan: TrainPlan,
                 chief: bool, keep: int = 0) -> dict[str, Any]:
    """One pass over this worker's share: exactly ``batching.steps`` steps (see BatchPlan).
    ``recent`` holds the last ``keep`` images it trained on (whole batches)."""
    t0 = last = time.monotonic()
    steps = seen = 0
    # rank 0 shows the epoch as a bar in the CLI; its last event comes with the validation
    bar = events.Phase(f"epoch {epoch}/{plan.spec.epochs}", "steps", batching.steps) \
        if chief else None
    losses: list[float] = []
    recent: deque[np.ndarray] = deque()
    kept = 0
    every = max(1, -(-batching.steps // PROGRESS_LINES))
    for batch in shard.iter_batches(batch_size=batching.local_batch, batch_format="numpy",
                                    drop_last=True,
                                    local_shuffle_buffer_size=max(4 * batching.local_batch, 1024),
                                    local_shuffle_seed=plan.spec.seed * 1000 + epoch):
        seen += 1
        if steps >= batching.steps:
            continue  # never step past what every worker can do
        losses.append(float(train_step(batch["x"], batch["y"])))
        steps += 1
        if keep:
            recent.append(batch["x"])
            kept += len(batch["x"])
            while kept - len(recent[0]) >= keep:
                kept -= len(recent.popleft())
        now = time.monotonic()
        if bar is not None and steps < batching.steps:
            bar.update(steps, loss=float(np.mean(losses[-every:])),
                       images_per_s=steps * batching.global_batch / max(1e-9, now - t0))
        due = steps % every == 0 or now - last > PROGRESS_EVERY_S
        if chief and due and steps < batching.steps:  # the last step has the epoch line
            rate = steps * batching.global_batch / (now - t0)
            log.info("%s", tr.progress_line(epoch, plan.spec.epochs, steps, batching.steps, rate,
                                            float(np.mean(losses[-every:]))))
            last = now
    return {"steps": steps, "batches": seen, "seconds": time.monotonic() - t0,
            "loss": float(np.mean(losses)) if losses else float("nan"), "recent": list(recent),
            "bar": bar}


def _close_epoch(lake: Lake, plan: TrainPlan, val: data.SplitRows, model: Any, optimizer: Any,
                 loss_fn: Any, state: dict[str, Any], board: _Board,
                 done: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: validate, book the epoch, checkpoint, TensorBoard, progress; the decision."""
    seconds = done["seconds"]
    record: dict[str, Any] = {
        "epoch": done["epoch"], "loss": done["loss"], "images": done["images"],
        "images_per_s": done["images"] / seconds if seconds else 0.0,
        "seconds": round(seconds, 3), "steps": done["steps"], "job_id": plan.job_id}
    recent = done.pop("recent", [])
    bar: events.Phase | None = done.pop("bar", None)
    if tr.precise_batchnorm(model, recent):
        record["bn_images"] = sum(len(x) for x in recent)  # what the statistics came from
    y, scores, _ = _validate(model, val, len(plan.data.labels))
    ev = tr.evaluate(y, scores, plan.data.labels)
    record.update(val_loss=tr.mean_loss(loss_fn, y, scores), val_mean_auroc=ev["mean_auroc"],
                  val_auroc=ev["auroc"])
    improved, stop = tr.end_epoch(state, record, plan.spec.patience, plan.spec.epochs)
    state.setdefault("jobs", [])
    if plan.job_id not in state["jobs"]:
        state["jobs"].append(plan.job_id)
    checkpoints.save(lake, plan, model, optimizer, state, improved)
    board.scalars(done["epoch"], {
        "train/loss": record["loss"], "val/loss": record["val_loss"],
        "val/mean_auroc": record["val_mean_auroc"], "train/images_per_s": record["images_per_s"],
        **{f"val/auroc/{k}": v for k, v in ev["auroc"].items()}})
    board.upload()
    log.info("%s", tr.epoch_line(record, plan.spec.epochs))
    if bar is not None:
        bar.finish(done["steps"], val_auroc=record["val_mean_auroc"], loss=record["loss"],
                   epoch_seconds=record["seconds"], images_per_s=record["images_per_s"])
    if stop:
        log.info("early stop after epoch %d: %s; best epoch %d", done["epoch"],
                 state["stopped"], state["best_epoch"])
    return {"stop": tr.finished(state, plan.spec.epochs), "epoch": done["epoch"],
            "improved": improved}


def _validate(model: Any, val: data.SplitRows, n_labels: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(targets, scores, each row's bootstrap unit) over the whole validation split; rank 0
    only."""
    ys, scores, units = [], [], []
    for batch in val.batches():
        ys.append(batch["y"])
        scores.append(tr.predict(model, [batch["x"]]))
        units.append(batch["g"])
    if not ys:
        return (np.zeros((0, n_labels), np.float32), np.zeros((0, n_labels), np.float32),
                np.zeros(0, object))
    return np.concatenate(ys), np.concatenate(scores), np.concatenate(units)


def restore_best(lake: Lake, plan: TrainPlan, model: Any, state: dict[str, Any],
                 best: tuple[int, list[Any]] | None) -> str:
    """Put the best epoch's weights into ``model``: from ``best`` (the epoch and weights rank 0
    kept) when it is the best epoch, else from the best checkpoint (a resumed training whose
    best epoch an earlier job trained). Says which."""
    if best is not None and best[0] == state["best_epoch"]:
        model.set_weights(best[1])
        return "memory"
    checkpoints.load_best(lake, plan, model)
    return "checkpoint"


def _finalise(lake: Lake, plan: TrainPlan, val: data.SplitRows, model: Any,
              state: dict[str, Any], best: tuple[int, list[Any]] | None = None) -> None:
    """Best weights -> calibration, operating points and metrics with intervals on validation
    -> the full .keras model + result in final/. ``best``: this job's best epoch and its
    weights, when it trained the best epoch; else they come from the best checkpoint."""
    from medray.workers import validation
    from medray.workers.models import set_head
    from medray.workers.operating_points import parse

    restore_best(lake, plan, model, state, best)
    y, scores, units = _validate(model, val, len(plan.data.labels))
    found = validation.summarise(y, scores, units, plan.data.labels, plan.data.multi_label,
                                 plan.val_split, parse(plan.spec.operating_point),
                                 calibrate=plan.spec.calibrate,
                                 form=plan.calibration_form)
    full = model
    if plan.cached:  # the head was trained alone: put it on the backbone it was fed by
        full, _ = initial_model(lake, plan.init, plan.shape)
        set_head(full, model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        full.save(str(path))
        lake.write_bytes(layout.training_model(plan.spec.model, plan.train_id),
                         path.read_bytes())
    lake.write_json(layout.training_result(plan.spec.model, plan.train_id),
                    json_safe({**found, "state": state, "job_id": plan.job_id}))


class _Board:
    """TensorBoard event files written locally by tf.summary, uploaded to the lake each epoch."""

    def __init__(self, lake: Lake, rel_dir: str) -> None:
        import tensorflow as tf

        self.lake, self.rel_dir = lake, rel_dir
        self.local = tempfile.mkdtemp(prefix="medray-tb-")
        self.writer = tf.summary.create_file_writer(self.local)

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        # tf.summary.scalar needs the tensorboard package; the core writer with the scalars
        # plugin's metadata writes the same events without it
        meta = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        with self.writer.as_default():
            for name, value in values.items():
                if value is not None and np.isfinite(value):
                    tf.summary.write(name, tf.constant(float(value), tf.float32), step=step,
                                     metadata=meta)

    def upload(self) -> None:
        self.writer.flush()
        for path in Path(self.local).rglob("*"):
            if path.is_file():
                self.lake.write_bytes(f"{self.rel_dir}/{path.relative_to(self.local)}",
                                      path.read_bytes())
