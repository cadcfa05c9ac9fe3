"""Training ids, what a resumed training may change, and the per-epoch checkpoints in the lake.

Every epoch rank 0 writes the weights, the optimizer state (Adam's moments and step count) and
``state.json`` (epoch, history, best epoch, early-stopping counter, the jobs involved) into
``checkpoints/epoch-NNNN/``; ``state.json`` is written last, as the epoch's commit point, and
``latest.json`` then points at the folder. A training with a ``latest.json`` has started:
reusing its id needs ``--resume``, so nothing is ever overwritten.
"""

from __future__ import annotations

import io
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.cluster.train.plan import TrainPlan
from medray.workers.errors import ConfigError
from medray.workers.specs import TrainSpec

# what makes a resumed training another model; anything else (epochs, patience, learning rate,
# workers, batch size...) may change and is listed in the card
MUST_MATCH = ("arch", "mode", "weights", "augment", "augment_recipe", "dataset_version",
              "labels")
_NOT_SETTINGS = {"resume", "run_id", "lake", "dataset_version", "labels"}
# what a spec record from before a field existed meant by leaving it out
_BEFORE_THE_FIELD = {"augment_recipe": "light"}


# ------------------------------------------------------------------------- training id, resume
def started(lake: Lake, model: str, train_id: str) -> bool:
    """Whether the training has a committed epoch to continue from."""
    return lake.exists(layout.checkpoint_latest(model, train_id))


def refuse_restart(lake: Lake, spec: TrainSpec) -> None:
    """ConfigError when ``--run-id`` names a started training and ``--resume`` is not given."""
    if spec.run_id and not spec.resume and started(lake, spec.model, spec.run_id):
        raise ConfigError(f"training {spec.run_id!r} of model {spec.model} already has "
                          "checkpoints: add --resume to continue it, or choose another --run-id")


def new_training_id(model: str) -> str:
    """A fresh training id ``<model>-<UTC time>-<random>``; the SDK makes it before submitting,
    so that ``--no-wait`` can name it."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{model}-{stamp}-{uuid.uuid4().hex[:6]}"


def choose_training(lake: Lake, spec: TrainSpec, job_id: str) -> tuple[str, bool]:
    """(training id, whether it has checkpoints to continue from).

    ``--run-id ID`` names the training: without ``--resume`` it must be new; with it, the
    training continues (or starts, if it never wrote a checkpoint). ``--resume`` alone picks the
    model's latest training. Otherwise a fresh id ``<model>-<UTC time>-<random>``.
    """
    if spec.run_id:
        refuse_restart(lake, spec)
        train_id = spec.run_id
        has_checkpoints = started(lake, spec.model, train_id)
    elif spec.resume:
        latest = lake.read_json_or_none(layout.latest_training(spec.model))
        if not latest:
            raise ConfigError(f"--resume: model {spec.model!r} has no training to continue; "
                              "pass --run-id ID (see `medray jobs logs` of the stopped job)")
        train_id = latest["training_id"]
        has_checkpoints = started(lake, spec.model, train_id)
    else:
        train_id, has_checkpoints = new_training_id(spec.model), False
    lake.write_json(layout.latest_training(spec.model), {
        "training_id": train_id, "job_id": job_id, "at": datetime.now(UTC).isoformat()})
    return train_id, has_checkpoints


def check_resume(saved: dict[str, Any], now: dict[str, Any], train_id: str) -> list[str]:
    """The settings a resumed training changes (sorted); ConfigError when the change would make
    it another model. Both sides are spec records as ``DatasetFacts.describe`` writes them."""
    saved, now = {**_BEFORE_THE_FIELD, **saved}, {**_BEFORE_THE_FIELD, **now}
    clash = [k for k in MUST_MATCH if saved.get(k) != now.get(k)]
    if clash:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in clash)
        raise ConfigError(f"cannot resume training {train_id!r} with different {detail}; resume "
                          "with the original settings or start a new training")
    return sorted(k for k in now if k not in _NOT_SETTINGS and saved.get(k) != now.get(k))


# -------------------------------------------------------------------------------- checkpoints
def save(lake: Lake, plan: TrainPlan, model: Any, optimizer: Any, state: dict[str, Any],
         best: bool) -> None:
    """Commit one epoch: weights, optimizer state, then state.json, then latest.json."""
    from medray.workers.training import optimizer_state

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.weights.h5"
        model.save_weights(str(weights))
        data = weights.read_bytes()
    # typed loosely: numpy's stubs take any ** argument for its allow_pickle flag
    arrays: dict[str, Any] = optimizer_state(optimizer)
    opt = io.BytesIO()
    np.savez(opt, **arrays)
    epoch_dir = layout.checkpoint_epoch(plan.spec.model, plan.train_id, int(state["epoch"]))
    lake.write_bytes(layout.checkpoint_weights(epoch_dir), data)
    lake.write_bytes(layout.checkpoint_optimizer(epoch_dir), opt.getvalue())
    if best:
        lake.write_bytes(layout.checkpoint_best(plan.spec.model, plan.train_id), data)
    lake.write_json(layout.checkpoint_state(epoch_dir), state)
    lake.write_json(layout.checkpoint_latest(plan.spec.model, plan.train_id),
                    {"epoch": state["epoch"], "dir": epoch_dir})


def restore(lake: Lake, plan: TrainPlan, model: Any, optimizer: Any) -> dict[str, Any] | None:
    """Load the last committed epoch into ``model`` and ``optimizer``; its state, or None for a
    training that has none (a fresh training id)."""
    from medray.workers.training import restore_optimizer

    latest = lake.read_json_or_none(layout.checkpoint_latest(plan.spec.model, plan.train_id))
    if not latest:
        return None
    epoch_dir = latest["dir"]
    state: dict[str, Any] = lake.read_json(layout.checkpoint_state(epoch_dir))
    _load_weights(model, lake.read_bytes(layout.checkpoint_weights(epoch_dir)))
    with np.load(io.BytesIO(lake.read_bytes(layout.checkpoint_optimizer(epoch_dir)))) as opt:
        restore_optimizer(optimizer, model, {k: opt[k] for k in opt.files})
    optimizer.learning_rate = plan.spec.learning_rate  # a resumed run may change it
    return state


def load_best(lake: Lake, plan: TrainPlan, model: Any) -> None:
    """Put the best epoch's weights into ``model`` (it keeps its own when none was best)."""
    best = layout.checkpoint_best(plan.spec.model, plan.train_id)
    if lake.exists(best):
        _load_weights(model, lake.read_bytes(best))


def _load_weights(model: Any, data: bytes) -> None:
    """Keras loads weights from a file only: through a temporary one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.weights.h5"
        path.write_bytes(data)
        model.load_weights(str(path))
