"""The train job: Ray Train's TensorflowTrainer with MultiWorkerMirroredStrategy.

Data: each worker streams its equal share of the staged shards (Ray Data ``streaming_split``,
no full copy per worker); rank 0 also reads the validation split, materialised once.
``--mode head`` without augmentation trains only the classifier on backbone features that Ray
Data computed once per shard and cached in the lake (``features/<arch>-<key>/...``), so the next
head retrain never runs the backbone. Checkpoints (weights + optimizer state + state.json) go
to the lake every epoch; ``--resume`` continues from the last one. The best epoch (mean
validation AUROC) becomes the registered model version, with thresholds chosen on validation.

Lake layout of one training: ``models/<model>/_training/<training id>/``: spec.json,
checkpoints/epoch-NNNN/{model.weights.h5,optimizer.npz,state.json}, checkpoints/latest.json,
checkpoints/best.weights.h5, tensorboard/, ranks/, init/ (an uploaded --weights file), final/.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.infra import faults
from medray.cluster.store import catalog, registry
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, InputError, MedrayError, NotFoundError
from medray.workers.models import (
    BACKBONES,
    WEIGHT_SUFFIXES,
    ModelCard,
    check_arch,
    parse_augment,
)
from medray.workers.shards import labels_to_targets

log = logging.getLogger(__name__)
COLUMNS = ["pixels", "labels", "split", "height", "width", "channels"]
READER_CPUS = 0.25  # shard readers are I/O bound; they must fit beside the training workers
# Keras Applications file name prefixes, to tell whether ImageNet weights are cached already
_IMAGENET_FILES = {"mobilenet_v2": "mobilenet_v2_weights", "efficientnet_b0": "efficientnetb0",
                   "densenet121": "densenet121_weights", "inception_v3": "inception_v3_weights"}


# ------------------------------------------------------------------------------------ reading
def _labelled(table: pa.Table, split: str) -> pa.Table:
    """Rows of one split whose ground truth is known, in a fresh random order.

    Shards keep staging order (a folder source is sorted by class), so rows are permuted here;
    the permutation is not seeded: see docs/training.md on nondeterminism.
    """
    table = table.filter(pc.and_(pc.equal(table.column("split"), split),
                                 pc.is_valid(table.column("labels"))))
    order = np.random.default_rng().permutation(table.num_rows)
    return table.take(pa.array(order, pa.int64())) if table.num_rows else table


def read_images(batch: dict[str, Any], lake_uri: str, split: str, labels: list[str],
                multi_label: bool, rows: int = 256) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: shard paths -> {"x": uint8 (n,H,W,C), "y": float32 (n,L)} of one split."""
    lake = Lake(lake_uri)
    for path in batch["path"]:
        table = _labelled(lake.read_parquet(str(path), columns=COLUMNS), split)
        for start in range(0, table.num_rows, rows):
            part = table.slice(start, rows)
            h, w, c = (part.column(k)[0].as_py() for k in ("height", "width", "channels"))
            blob = b"".join(part.column("pixels").to_pylist())
            x = np.frombuffer(blob, np.uint8).reshape(part.num_rows, h, w, c)
            y = labels_to_targets(part.column("labels").to_pylist(), labels, multi_label)
            yield {"x": x, "y": y}


def read_features(batch: dict[str, Any], lake_uri: str, split: str, labels: list[str],
                  multi_label: bool, rows: int = 1024) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: cached feature files -> {"x": float32 (n,D), "y": float32 (n,L)}."""
    lake = Lake(lake_uri)
    for path in batch["path"]:
        table = _labelled(lake.read_parquet(str(path)), split)
        for start in range(0, table.num_rows, rows):
            part = table.slice(start, rows)
            col = part.column("features").combine_chunks()
            x = col.flatten().to_numpy(zero_copy_only=False).reshape(part.num_rows, -1)
            y = labels_to_targets(part.column("labels").to_pylist(), labels, multi_label)
            yield {"x": x.astype(np.float32, copy=False), "y": y}


def count_rows(lake: Lake, manifest: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """Labelled images per split and positives per label in train (reads two columns)."""
    per_split: dict[str, int] = {}
    positives = dict.fromkeys(labels, 0)
    for shard in manifest["shards"]:
        table = lake.read_parquet(shard["path"], columns=["split", "labels"])
        table = table.filter(pc.is_valid(table.column("labels")))
        for split, n in zip(*_value_counts(table.column("split")), strict=True):
            per_split[split] = per_split.get(split, 0) + n
        train = table.filter(pc.equal(table.column("split"), "train")).column("labels")
        for names in train.to_pylist():
            for name in names or ():
                if name in positives:
                    positives[name] += 1
    return {"splits": per_split, "positives": positives}


def _value_counts(col: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    counts = pc.value_counts(col)
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()


# ------------------------------------------------------------------------------------ weights
@dataclass(frozen=True)
class InitWeights:
    """Where the initial weights come from. ``identity`` names them for the feature cache."""

    kind: str  # none | imagenet | file | model
    identity: str
    path: str | None = None  # lake-relative file (kind file) or model file (kind model)
    source: str = "none"  # as the user gave it, for the model card


def _weights_kind(weights: str) -> str:
    if weights in ("none", "imagenet"):
        return weights
    if weights.lower().endswith(WEIGHT_SUFFIXES):
        return "file"
    return "model"


def resolve_weights(lake: Lake, spec: dict[str, Any], run_dir: str | None) -> InitWeights:
    """Check ``--weights`` and, for a local file, upload it beside the run (workers on other
    nodes read it from the lake). Never imports TensorFlow."""
    weights = spec["weights"]
    kind = _weights_kind(weights)
    if kind in ("none", "imagenet"):
        return InitWeights(kind, kind, source=kind)
    if kind == "file":
        local = Path(weights).expanduser()
        uploaded = f"{run_dir}/init/{local.name}" if run_dir else None
        if local.is_file():
            data = local.read_bytes()
            rel = uploaded
            if rel and not lake.exists(rel):
                lake.write_bytes(rel, data)
        else:
            # a resumed training finds the copy it uploaded, even if the local file is gone
            rel = next((c for c in (uploaded, None if weights.startswith("/") else weights)
                        if c and lake.exists(c)), None)
            if rel is None:
                raise NotFoundError(f"--weights {weights}: no such file here or in the lake "
                                    f"{lake.uri}; give a local path or a lake-relative path")
            data = lake.read_bytes(rel)
        return InitWeights("file", "file:" + hashlib.sha256(data).hexdigest(), rel, weights)
    try:
        card = registry.resolve(lake, weights)
    except ConfigError as exc:
        raise ConfigError(f"--weights {weights!r}: use none, imagenet, a .keras/.weights.h5/.h5 "
                          "file or an earlier model as NAME:VERSION") from exc
    return InitWeights("model", f"model:{card.name}:{card.version}",
                       f"models/{card.name}/{card.version}/model.keras", weights)


def imagenet_reachable(arch: str, timeout_s: float = 3.0) -> bool:
    """Cached Keras Applications weights, or a TCP connection to their host; no TensorFlow."""
    cache = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"
    prefix = _IMAGENET_FILES.get(arch, arch)
    if cache.is_dir() and any(p.name.startswith(prefix) for p in cache.iterdir()):
        return True
    try:
        with socket.create_connection(("storage.googleapis.com", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def precheck(spec: dict[str, Any], lake: Lake, check_network: bool = True) -> None:
    """What a train spec can be checked for before submission (fast, no TensorFlow):
    the dataset, the arch against its image size, --augment, --weights, ImageNet reachability
    (``check_network``: only where this machine's network is the cluster's, i.e. a local one)."""
    _, _, manifest = catalog.resolve(lake, spec["dataset"])
    check_arch(spec["arch"], int(manifest["image_size"]))
    parse_augment(spec.get("augment"))
    if not manifest.get("labels"):
        raise ConfigError(f"dataset {spec['dataset']} has no labels to train on")
    if spec["weights"] == "imagenet" and spec["arch"] not in BACKBONES:
        raise ConfigError("--weights imagenet needs an ImageNet --arch ("
                          f"{', '.join(BACKBONES)}); small_cnn has no pretrained weights")
    if spec["weights"] == "imagenet" and check_network and not imagenet_reachable(spec["arch"]):
        raise InputError(f"--weights imagenet: cannot reach storage.googleapis.com and no cached "
                         f"{spec['arch']} weights in ~/.keras/models; pass --weights PATH with a "
                         ".keras, .weights.h5 or Keras Applications .h5 file instead")
    run_dir = f"models/{spec['model']}/_training/{spec['run_id']}" if spec.get("run_id") else None
    resolve_weights(lake, spec, run_dir if spec.get("resume") else None)
    if run_dir and not spec.get("resume") and lake.exists(f"{run_dir}/checkpoints/latest.json"):
        raise ConfigError(f"training {spec['run_id']!r} of model {spec['model']} already has "
                          "checkpoints: add --resume to continue it, or choose another --run-id")


def _local_copy(lake: Lake, rel: str, tmp: str) -> str:
    suffix = next((s for s in WEIGHT_SUFFIXES if rel.lower().endswith(s)), ".keras")
    path = Path(tmp) / f"init{suffix}"
    path.write_bytes(lake.read_bytes(rel))
    return str(path)


def initial_model(lake: Lake, init: InitWeights, arch: str, size: int, channels: int,
                  n_labels: int, multi: bool, seed: int, augment: Any = None) -> tuple[Any, str]:
    """The model training starts from: built from the seed (or ImageNet), then --weights."""
    from medray.workers.models import apply_weights_file, build_model

    model = build_model(arch, size, channels, n_labels, multi,
                        weights="imagenet" if init.kind == "imagenet" else "none", seed=seed,
                        augment=augment)
    note = init.kind if init.kind in ("none", "imagenet") else ""
    if init.kind in ("file", "model") and init.path:
        with tempfile.TemporaryDirectory() as tmp:
            note = apply_weights_file(model, _local_copy(lake, init.path, tmp))
    return model, note


# ------------------------------------------------------------------------------ feature cache
def feature_file(key: str, shard_path: str) -> str:
    """'datasets/cxr/2/shards/part-00003.parquet' -> 'features/<key>/cxr/2/part-00003.parquet'.

    Keyed by the shard, which never changes once committed; a later dataset version that
    carries the shard over (re-staging) reuses its features.
    """
    parts = shard_path.split("/")
    return f"features/{key}/{parts[1]}/{parts[2]}/{parts[-1]}"


class FeatureWriter:
    """Ray Data UDF (an actor): one shard -> one Parquet file of backbone features.

    Columns: image_id, split, labels, features (fixed-size list of float32). A JSON marker
    written after the file says who computed it and when; it is the commit point.
    """

    def __init__(self, lake_uri: str, key: str, init: dict[str, Any], build: dict[str, Any],
                 job_id: str, batch_size: int = 64) -> None:
        from medray.workers.models import configure_tensorflow, feature_extractor

        configure_tensorflow()
        self.lake, self.key, self.job_id, self.batch = Lake(lake_uri), key, job_id, batch_size
        model, _ = initial_model(self.lake, InitWeights(**init), **build)
        self.extract = feature_extractor(model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"shard": [], "rows": [], "seconds": []}
        for path in batch["path"]:
            t0 = time.monotonic()
            table = self.lake.read_parquet(str(path), columns=["image_id", *COLUMNS])
            feats = []
            for start in range(0, table.num_rows, self.batch):
                part = table.slice(start, self.batch)
                h, w, c = (part.column(k)[0].as_py() for k in ("height", "width", "channels"))
                x = np.frombuffer(b"".join(part.column("pixels").to_pylist()), np.uint8)
                x = x.reshape(part.num_rows, h, w, c).astype(np.float32)
                feats.append(np.asarray(self.extract(x, training=False), np.float32))
            flat = np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)
            dim = int(flat.shape[1])
            column = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), dim)
            rel = feature_file(self.key, str(path))
            self.lake.write_parquet(rel, pa.table({
                "image_id": table.column("image_id"), "split": table.column("split"),
                "labels": table.column("labels"), "features": column}))
            seconds = time.monotonic() - t0
            self.lake.write_json(rel.removesuffix(".parquet") + ".json", {
                "shard": str(path), "rows": table.num_rows, "dim": dim, "job_id": self.job_id,
                "computed_at": datetime.now(UTC).isoformat(), "seconds": round(seconds, 3)})
            out["shard"].append(str(path))
            out["rows"].append(table.num_rows)
            out["seconds"].append(seconds)
        return out


def ensure_features(lake: Lake, key: str, covers: dict[str, Any], shards: list[str],
                    init: InitWeights, build: dict[str, Any], spec: dict[str, Any],
                    job_id: str) -> dict[str, Any]:
    """Compute (once) the features of every shard not yet in the cache, in parallel Ray Data
    actors; returns which were computed now and which were reused."""
    import ray

    base = f"features/{key}"
    if not lake.exists(f"{base}/_key.json"):
        lake.write_json(f"{base}/_key.json", covers)
    todo = [p for p in shards
            if not lake.exists(feature_file(key, p).removesuffix(".parquet") + ".json")]
    computed: list[dict[str, Any]] = []
    if todo:
        log.info("[%s] computing %s features for %d of %d shards (cache %s)", job_id,
                 build["arch"], len(todo), len(shards), lake.full_uri(base))
        gpus = float(spec["gpus_per_worker"])
        ds = ray.data.from_items([{"path": p} for p in todo],
                                 override_num_blocks=len(todo)).map_batches(
            FeatureWriter, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"lake_uri": lake.uri, "key": key, "init": asdict(init),
                                   "build": build, "job_id": job_id},
            compute=ray.data.ActorPoolStrategy(
                min_size=1, max_size=max(1, min(len(todo), int(spec["workers"])))),
            num_cpus=float(spec["cpus_per_worker"]), num_gpus=gpus or None)
        computed = [{"shard": r["shard"], "rows": int(r["rows"]), "seconds": float(r["seconds"])}
                    for r in ds.take_all()]
        lake.write_json(f"{base}/_events/{job_id}.json", {
            "job_id": job_id, "at": datetime.now(UTC).isoformat(), "computed": computed})
    else:
        log.info("[%s] all %d shards have cached %s features: the backbone does not run",
                 job_id, len(shards), build["arch"])
    return {"key": key, "uri": lake.full_uri(base), "computed_shards": len(todo),
            "reused_shards": len(shards) - len(todo),
            "files": [feature_file(key, p) for p in shards]}


# ------------------------------------------------------------------------- training id, resume
_MUST_MATCH = ("arch", "mode", "weights", "augment", "dataset_version", "labels")


def choose_training(lake: Lake, spec: dict[str, Any], job_id: str) -> tuple[str, bool]:
    """(training id, whether it has checkpoints to continue from).

    ``--run-id ID`` names the training: without ``--resume`` it must be new; with it, the
    training continues (or starts, if it never wrote a checkpoint). ``--resume`` alone picks the
    model's latest training. Otherwise a fresh id ``<model>-<UTC time>-<random>``.
    """
    base = f"models/{spec['model']}/_training"
    if spec.get("run_id"):
        train_id = spec["run_id"]
        started = lake.exists(f"{base}/{train_id}/checkpoints/latest.json")
        if started and not spec["resume"]:
            raise ConfigError(f"training {train_id!r} of model {spec['model']} already has "
                              "checkpoints: add --resume to continue it, or choose another "
                              "--run-id")
    elif spec["resume"]:
        latest = lake.read_json_or_none(f"{base}/latest.json")
        if not latest:
            raise ConfigError(f"--resume: model {spec['model']!r} has no training to continue; "
                              "pass --run-id ID (see `medray jobs logs` of the stopped job)")
        train_id = latest["training_id"]
        started = lake.exists(f"{base}/{train_id}/checkpoints/latest.json")
    else:
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        train_id, started = f"{spec['model']}-{stamp}-{uuid.uuid4().hex[:6]}", False
    lake.write_json(f"{base}/latest.json", {"training_id": train_id, "job_id": job_id,
                                           "at": datetime.now(UTC).isoformat()})
    return train_id, started


def _check_resume(saved: dict[str, Any], now: dict[str, Any], train_id: str) -> list[str]:
    """ConfigError when the resumed training would be another model; the changed settings
    that are allowed (epochs, patience, learning rate, workers...) are returned."""
    clash = [k for k in _MUST_MATCH if saved.get(k) != now.get(k)]
    if clash:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in clash)
        raise ConfigError(f"cannot resume training {train_id!r} with different {detail}; resume "
                          "with the original settings or start a new training")
    skip = {"resume", "run_id", "lake", "dataset_version", "labels", "job_ids"}
    return sorted(k for k in now if k not in skip and saved.get(k) != now.get(k))


# --------------------------------------------------------------------------- the worker loop
def _worker_logger(job_id: str) -> logging.Logger:
    """Progress lines on the worker's stdout: Ray streams them into the job logs (and the CLI)."""
    wlog = logging.getLogger(f"{__name__}.worker")
    if not wlog.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(f"%(asctime)s [job {job_id}] train: %(message)s"))
        wlog.addHandler(handler)
        wlog.setLevel(logging.INFO)
        wlog.propagate = False
    return wlog


def _quiet_tensorflow() -> None:
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)
    try:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)
    except ImportError:  # absl ships with TensorFlow; nothing to quiet without it
        pass


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
    lake.write_json(f"{epoch_dir}/state.json", state)  # the epoch's commit point
    lake.write_json(f"{ckpt_dir}/latest.json", {"epoch": state["epoch"], "dir": epoch_dir})


def _load_weights(model: Any, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.weights.h5"
        path.write_bytes(data)
        model.load_weights(str(path))


def _build_trainable(lake: Lake, config: dict[str, Any]) -> tuple[Any, str]:
    """The model the optimizer updates: the head alone on cached features, else the full model
    (backbone frozen for --mode head)."""
    from medray.workers.models import build_head, freeze_backbone, parse_augment

    spec = config["spec"]
    if config["cached"]:
        head = build_head(config["feature_dim"], len(config["labels"]), config["multi_label"],
                          seed=spec["seed"])
        return head, "head on cached features"
    model, note = initial_model(lake, InitWeights(**config["init"]), spec["arch"],
                                config["image_size"], config["channels"], len(config["labels"]),
                                config["multi_label"], spec["seed"],
                                parse_augment(spec["augment"]))
    if spec["mode"] == "head":
        freeze_backbone(model)
    return model, note


def train_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import keras
    import ray.train
    import tensorflow as tf
    from ray.train.collective import broadcast_from_rank_zero

    from medray.workers import training as tr
    from medray.workers.models import configure_tensorflow

    _quiet_tensorflow()
    configure_tensorflow()
    spec, multi = config["spec"], config["multi_label"]
    wlog = _worker_logger(config["job_id"])
    lake = Lake(config["lake_uri"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    plan = tr.plan_batches(config["train_rows"], spec["batch_size"], world,
                           tr.local_replicas(strategy))
    ckpt_dir = config["ckpt_dir"]
    with strategy.scope():
        model, note = _build_trainable(lake, config)
        optimizer = keras.optimizers.Adam(learning_rate=spec["learning_rate"])
        optimizer.build(model.trainable_variables)
        state = tr.new_state()
        latest = lake.read_json_or_none(f"{ckpt_dir}/latest.json")
        if latest:  # a fresh training id has none, so this is --resume (or a restarted worker)
            state = lake.read_json(f"{latest['dir']}/state.json")
            _load_weights(model, lake.read_bytes(f"{latest['dir']}/model.weights.h5"))
            with np.load(io.BytesIO(lake.read_bytes(f"{latest['dir']}/optimizer.npz"))) as opt:
                tr.restore_optimizer(optimizer, model, {k: opt[k] for k in opt.files})
            optimizer.learning_rate = spec["learning_rate"]  # a resumed run may change it
        pos_w, neg_w = config["class_weights"]
        loss_fn = tr.make_loss(multi, None if pos_w is None else np.array(pos_w, np.float32),
                               None if neg_w is None else np.array(neg_w, np.float32))
        train_step = tr.make_train_step(strategy, model, optimizer, loss_fn, plan.global_batch)
    if rank == 0:
        wlog.info("training %s: %s on %d images, %d worker(s) x %d images per step, %d steps "
                  "per epoch; initial weights: %s", config["train_id"], spec["arch"],
                  config["train_rows"], world, plan.local_batch, plan.steps, note)
        if latest:
            wlog.info("resumed from the checkpoint of epoch %d (best epoch %d)", state["epoch"],
                      state["best_epoch"])
    board = _Board(lake, f"{config['run_dir']}/tensorboard") if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    fault = faults.train_exit_epoch()
    mine: dict[str, Any] = {}
    epoch = int(state["epoch"])
    stop = tr.finished(state, spec["epochs"])  # every rank read the same checkpoint
    while not stop:
        epoch += 1
        done = _train_epoch(shard, train_step, plan, epoch, spec, rank == 0, wlog)
        mine[str(epoch)] = {k: done[k] for k in ("steps", "batches")}
        mine[str(epoch)]["images"] = done["steps"] * plan.local_batch
        decision: dict[str, Any] | None = None
        if rank == 0 and board is not None:
            decision = _close_epoch(lake, config, model, optimizer, loss_fn, state, board, wlog,
                                    {**done, "epoch": epoch,
                                     "images": done["steps"] * plan.global_batch})
        decision = broadcast_from_rank_zero(decision)  # one decision, whatever BN drift says
        ray.train.report({"epoch": epoch, "steps": done["steps"]})
        if fault == epoch and rank == 0:
            wlog.info("MEDRAY_FAULT: exiting after epoch %d", epoch)
            faults.die()
        stop = bool(decision["stop"])
    lake.write_json(f"{config['run_dir']}/ranks/{config['job_id']}-rank{rank}.json",
                    {"rank": rank, "world": world, "plan": asdict(plan), "epochs": mine})
    if rank == 0:
        _finalise(lake, config, model, state)


def _train_epoch(shard: Any, train_step: Any, plan: Any, epoch: int, spec: dict[str, Any],
                 chief: bool, wlog: logging.Logger) -> dict[str, Any]:
    """One pass over this worker's share: exactly ``plan.steps`` steps (see BatchPlan)."""
    from medray.workers import training as tr

    t0 = last = time.monotonic()
    steps = batches = 0
    losses: list[float] = []
    every = max(1, -(-plan.steps // 4))  # about four progress lines per epoch
    for batch in shard.iter_batches(batch_size=plan.local_batch, batch_format="numpy",
                                    drop_last=True,
                                    local_shuffle_buffer_size=max(4 * plan.local_batch, 1024),
                                    local_shuffle_seed=spec["seed"] * 1000 + epoch):
        batches += 1
        if steps >= plan.steps:
            continue  # never step past what every worker can do
        losses.append(float(train_step(batch["x"], batch["y"])))
        steps += 1
        now = time.monotonic()
        if chief and (steps % every == 0 or now - last > 30) and steps < plan.steps:
            rate = steps * plan.global_batch / (now - t0)
            wlog.info(tr.progress_line(epoch, spec["epochs"], steps, plan.steps, rate,
                                       float(np.mean(losses[-every:]))))
            last = now
    return {"steps": steps, "batches": batches, "seconds": time.monotonic() - t0,
            "loss": float(np.mean(losses)) if losses else float("nan")}


def _close_epoch(lake: Lake, config: dict[str, Any], model: Any, optimizer: Any, loss_fn: Any,
                 state: dict[str, Any], board: _Board, wlog: logging.Logger,
                 done: dict[str, Any]) -> dict[str, Any]:
    """Rank 0: validate, book the epoch, checkpoint, TensorBoard, progress; the decision."""
    from medray.workers import training as tr

    spec = config["spec"]
    seconds = done["seconds"]
    record: dict[str, Any] = {
        "epoch": done["epoch"], "loss": done["loss"], "images": done["images"],
        "images_per_s": done["images"] / seconds if seconds else 0.0,
        "seconds": round(seconds, 3), "steps": done["steps"], "job_id": config["job_id"]}
    y, scores = _validate(model, config)
    ev = tr.evaluate(y, scores, config["labels"])
    record.update(val_loss=tr.mean_loss(loss_fn, y, scores), val_mean_auroc=ev["mean_auroc"],
                  val_auroc=ev["auroc"])
    improved, stop = tr.end_epoch(state, record, spec["patience"], spec["epochs"])
    state.setdefault("jobs", [])
    if config["job_id"] not in state["jobs"]:
        state["jobs"].append(config["job_id"])
    _save_checkpoint(lake, config["ckpt_dir"], model, optimizer, state, improved)
    board.scalars(done["epoch"], {
        "train/loss": record["loss"], "val/loss": record["val_loss"],
        "val/mean_auroc": record["val_mean_auroc"], "train/images_per_s": record["images_per_s"],
        **{f"val/auroc/{k}": v for k, v in ev["auroc"].items()}})
    board.upload()
    wlog.info(tr.epoch_line(record, spec["epochs"]))
    if stop:
        wlog.info("early stop after epoch %d: %s; best epoch %d", done["epoch"],
                  state["stopped"], state["best_epoch"])
    return {"stop": tr.finished(state, spec["epochs"]), "epoch": done["epoch"]}


def _validate(model: Any, config: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(targets, scores) over the whole validation split; rank 0 only."""
    import ray.train

    from medray.workers import training as tr

    ys, scores = [], []
    for batch in ray.train.get_dataset_shard("val").iter_batches(batch_size=256,
                                                                   batch_format="numpy"):
        ys.append(batch["y"])
        scores.append(tr.predict(model, [batch["x"]]))
    n_labels = len(config["labels"])
    if not ys:
        return np.zeros((0, n_labels), np.float32), np.zeros((0, n_labels), np.float32)
    return np.concatenate(ys), np.concatenate(scores)


def _finalise(lake: Lake, config: dict[str, Any], model: Any, state: dict[str, Any]) -> None:
    """Best weights -> thresholds on validation -> the full .keras model + result in final/."""
    from medray.workers import training as tr
    from medray.workers.models import set_head

    ckpt_dir = config["ckpt_dir"]
    if lake.exists(f"{ckpt_dir}/best.weights.h5"):
        _load_weights(model, lake.read_bytes(f"{ckpt_dir}/best.weights.h5"))
    y, scores = _validate(model, config)
    thresholds = tr.choose_thresholds(y, scores, config["labels"])
    full = model
    if config["cached"]:  # the head was trained alone: put it on the backbone it was fed by
        spec = config["spec"]
        full, _ = initial_model(lake, InitWeights(**config["init"]), spec["arch"],
                                config["image_size"], config["channels"], len(config["labels"]),
                                config["multi_label"], spec["seed"])
        set_head(full, model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        full.save(str(path))
        lake.write_bytes(f"{config['run_dir']}/final/model.keras", path.read_bytes())
    lake.write_json(f"{config['run_dir']}/final/result.json",
                    {"thresholds": thresholds, "state": state, "job_id": config["job_id"]})


# -------------------------------------------------------------------------------- the driver
def _check_resources(spec: dict[str, Any]) -> None:
    import ray

    total = ray.cluster_resources()
    need_cpu = spec["workers"] * spec["cpus_per_worker"] + READER_CPUS
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"{spec['workers']} worker(s) x {spec['cpus_per_worker']} CPU plus {READER_CPUS} CPU "
            f"for the data readers need {need_cpu:g} CPUs; the cluster has "
            f"{total.get('CPU', 0):g}: lower --workers or --cpus-per-worker (e.g. 0.5), or add "
            "nodes")
    need_gpu = spec["workers"] * spec["gpus_per_worker"]
    if need_gpu and total.get("GPU", 0) < need_gpu:
        raise ConfigError(f"--gpus-per-worker {spec['gpus_per_worker']} x {spec['workers']} "
                          f"workers needs {need_gpu:g} GPUs; the cluster has "
                          f"{total.get('GPU', 0):g}")


def _dataset(paths: list[str], reader: Any, lake: Lake, split: str, labels: list[str],
             multi: bool) -> Any:
    import ray

    return ray.data.from_items([{"path": p} for p in paths],
                               override_num_blocks=len(paths)).map_batches(
        reader, fn_kwargs={"lake_uri": lake.uri, "split": split, "labels": labels,
                           "multi_label": multi},
        batch_size=1, batch_format="numpy", num_cpus=READER_CPUS,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(4, len(paths)))))


def _unwrap(exc: BaseException) -> BaseException:
    """The medray error a worker raised, out of Ray Train's wrappers (so bad input exits 2)."""
    seen: list[BaseException] = [exc]
    while seen:
        err = seen.pop()
        if isinstance(err, MedrayError):
            return err
        seen.extend(getattr(err, "worker_failures", {}).values())
        for attr in ("cause", "__cause__", "controller_failure"):
            inner = getattr(err, attr, None)
            if isinstance(inner, BaseException):
                seen.append(inner)
    return exc


def _run_dict(spec: dict[str, Any], lake: Lake, job_id: str) -> dict[str, Any]:
    started = time.monotonic()
    dataset, dversion, manifest = catalog.resolve(lake, spec["dataset"])
    labels, multi = list(manifest["labels"]), bool(manifest["multi_label"])
    size, channels = int(manifest["image_size"]), int(manifest["channels"])
    precheck(spec, lake)
    augment = parse_augment(spec["augment"])
    train_id, started_before = choose_training(lake, spec, job_id)
    run_dir = f"models/{spec['model']}/_training/{train_id}"
    log.info("[%s] training id %s (continue it with --resume --run-id %s)", job_id, train_id,
             train_id)
    done = lake.read_json_or_none(f"{run_dir}/final/registered.json")
    if done:
        log.info("[%s] training %s already finished as %s:%s; nothing to do", job_id, train_id,
                 done["model"], done["version"])
        return dict(done)
    described = {**spec, "dataset": dataset, "dataset_version": dversion, "labels": labels,
                 "multi_label": multi, "image_size": size, "channels": channels}
    saved = lake.read_json_or_none(f"{run_dir}/spec.json")
    changed = _check_resume(saved, described, train_id) if saved and started_before else []
    if changed:
        log.info("[%s] resuming with changed settings: %s", job_id, changed)
    if not saved or not started_before:
        lake.write_json(f"{run_dir}/spec.json", described)

    rows = count_rows(lake, manifest, labels)
    train_rows = rows["splits"].get("train", 0)
    val_split = "val" if rows["splits"].get("val") else "test"
    if val_split == "test":
        log.warning("[%s] no labelled val split: validating (and choosing thresholds) on test",
                    job_id)
    from medray.workers import training as tr

    tr.plan_batches(train_rows, spec["batch_size"], spec["workers"])  # fail here, not in Ray
    pos_w = neg_w = None
    if spec["class_weights"] == "auto":
        pos_w, neg_w = tr.class_weights(rows["positives"], labels, train_rows, multi)
    init = resolve_weights(lake, spec, run_dir)
    if init.kind == "imagenet":  # the real Keras download, here once, so it fails fast
        from medray.workers.models import build_model

        build_model(spec["arch"], size, channels, len(labels), multi, weights="imagenet")
    _check_resources(spec)

    shards = [s["path"] for s in manifest["shards"]]
    cached = spec["mode"] == "head" and augment is None
    features: dict[str, Any] | None = None
    feature_dim = 0
    reader: Any = read_images
    if cached:
        import keras

        key, covers = tr.feature_key(spec["arch"], size, channels, init.identity, spec["seed"],
                                     keras.__version__)
        build = {"arch": spec["arch"], "size": size, "channels": channels,
                 "n_labels": len(labels), "multi": multi, "seed": spec["seed"]}
        features = ensure_features(lake, key, covers, shards, init, build, spec, job_id)
        shards = features["files"]
        feature_dim = int(lake.read_json(shards[0].removesuffix(".parquet") + ".json")["dim"])
        reader = read_features
    train_ds = _dataset(shards, reader, lake, "train", labels, multi)
    val_ds = _dataset(shards, reader, lake, val_split, labels, multi).materialize()

    config = {
        "spec": spec, "lake_uri": lake.uri, "labels": labels, "multi_label": multi,
        "image_size": size, "channels": channels, "train_rows": train_rows,
        "ckpt_dir": f"{run_dir}/checkpoints", "run_dir": run_dir, "train_id": train_id,
        "job_id": job_id, "init": asdict(init), "cached": cached, "feature_dim": feature_dim,
        "class_weights": (None if pos_w is None else pos_w.tolist(),
                          None if neg_w is None else neg_w.tolist()),
    }
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer  # imports TensorFlow: after the checks

    gpus = float(spec["gpus_per_worker"])
    trainer = TensorflowTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=spec["workers"], use_gpu=bool(gpus),
            resources_per_worker={"CPU": spec["cpus_per_worker"], **({"GPU": gpus} if gpus
                                                                      else {})}),
        run_config=RunConfig(name=f"medray-{train_id}-{job_id}",
                             storage_path=str(Path(tempfile.gettempdir()) / "medray-train")),
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    try:
        trainer.fit()
    except Exception as exc:
        cause = _unwrap(exc)
        if cause is not exc:
            raise cause from exc
        raise
    final = lake.read_json_or_none(f"{run_dir}/final/result.json")
    if final is None:
        raise InputError("training ended without a final model (see the worker logs)")
    return _register(lake, spec, final, init, features, described, changed, train_id, run_dir,
                     val_split, pos_w, neg_w, started, job_id)


def _register(lake: Lake, spec: dict[str, Any], final: dict[str, Any], init: InitWeights,
              features: dict[str, Any] | None, described: dict[str, Any], changed: list[str],
              train_id: str, run_dir: str, val_split: str, pos_w: np.ndarray | None,
              neg_w: np.ndarray | None, started: float, job_id: str) -> dict[str, Any]:
    state, labels = final["state"], described["labels"]
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]),
                state["history"][-1] if state["history"] else {})
    loss_weights = None
    if pos_w is not None and neg_w is not None:
        loss_weights = {lab: {"positive": float(p), "negative": float(n)}
                        for lab, p, n in zip(labels, pos_w, neg_w, strict=True)}
    multi = bool(described["multi_label"])
    card = ModelCard(
        name=spec["model"], labels=labels, multi_label=multi,
        input_size=described["image_size"], channels=described["channels"], arch=spec["arch"],
        thresholds=final["thresholds"], dataset=described["dataset"],
        dataset_version=described["dataset_version"], weights=init.source,
        preprocessing="uint8 pixels in; scaling (and gray->RGB for ImageNet backbones) inside "
                      "the model",
        hyperparameters={**{k: spec[k] for k in (
            "epochs", "batch_size", "learning_rate", "workers", "cpus_per_worker",
            "gpus_per_worker", "mode", "augment", "class_weights", "seed", "patience")},
            "optimizer": "adam", "loss": "weighted binary cross-entropy (CheXNet)" if multi
            else "weighted categorical cross-entropy",
            "loss_weights": loss_weights},
        metrics={"val_split": val_split, "best_epoch": state["best_epoch"],
                 "val_mean_auroc": best.get("val_mean_auroc"), "val_loss": best.get("val_loss"),
                 "val_auroc": best.get("val_auroc"), "epochs_run": state["epoch"],
                 "stopped": state.get("stopped"), "history": state["history"]},
        training_seconds=round(sum(h.get("seconds", 0.0) for h in state["history"]), 1),
        code_version=_code_version(),
        training={"id": train_id, "jobs": state.get("jobs", [job_id]),
                  "resumed": len(state.get("jobs", [])) > 1, "changed_on_resume": changed,
                  "weights_identity": init.identity, "feature_cache": features and {
                      k: features[k] for k in ("key", "uri", "computed_shards",
                                               "reused_shards")},
                  "tensorboard": lake.full_uri(f"{run_dir}/tensorboard"),
                  "job_seconds": round(time.monotonic() - started, 1)},
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        path.write_bytes(lake.read_bytes(f"{run_dir}/final/model.keras"))
        card = registry.register(lake, str(path), card)
    log.info("[%s] registered %s:%s (best epoch %s, val mean AUROC %s)", job_id, card.name,
             card.version, state["best_epoch"], best.get("val_mean_auroc"))
    result = {"model": card.name, "version": card.version, "training_id": train_id,
              "uri": lake.full_uri(f"models/{card.name}/{card.version}"),
              "metrics": {"val_mean_auroc": best.get("val_mean_auroc"),
                          "val_auroc": best.get("val_auroc"), "best_epoch": state["best_epoch"],
                          "epochs_run": state["epoch"]},
              "features": card.training.get("feature_cache")}
    lake.write_json(f"{run_dir}/final/registered.json", result)
    return result


def _code_version() -> str:
    try:
        from importlib.metadata import version

        return f"medray {version('medray')}"
    except Exception:  # noqa: BLE001 - a card without a version is still a card
        return "medray (unknown)"


def run(spec: Any, lake: Any, ctx: Any) -> dict[str, Any]:  # transitional: typed spec below
    return _run_dict(spec.model_dump(), lake, ctx.job_id)
