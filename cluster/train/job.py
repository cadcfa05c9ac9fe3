"""The train job on the job driver: plan the training, run Ray Train, register the model.

The driver resolves everything the workers need into one frozen ``TrainPlan`` (the training
id, the dataset, class weights, initial weights, the head-mode feature cache), checks the
cluster's resources, and runs Ray Train (``MultiWorkerMirroredStrategy``, with medray's own
backend, ``backend.py``) with the loop in ``remote.py``. Each worker streams its equal share of
the train split; rank 0 also scores the validation split, which it reads itself in a thread
from its start (``data.SplitRows``). The best epoch (mean validation AUROC) becomes the next
version of the model, with its card: temperature scaling and operating points fitted on
validation, validation metrics with patient-level intervals, the training data's counts, the
intended use and the limitations (``workers/model_card.py``). A training that already
registered its model returns that version and registers nothing new.

A worker lost with its node restarts, with the rest of its worker group, from the last
checkpoint (up to ``restarts.MAX_FAILURES`` times); anything else a worker raises fails the job
at once (``restarts.py``). The job's result says how often it restarted and from which epochs.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from medray.cluster.infra import autoscale, env
from medray.cluster.infra.context import JobContext
from medray.cluster.store import catalog, layout, registry
from medray.cluster.store.lake import Lake
from medray.cluster.train import checkpoints, data, in_driver, precheck, restarts
from medray.cluster.train.features import FeatureCache, ensure_features
from medray.cluster.train.plan import PLAN, DatasetFacts, TrainPlan
from medray.cluster.train.weights import resolve_weights
from medray.workers import model_card
from medray.workers import training as tr
from medray.workers.errors import ConfigError, InputError, MedrayError
from medray.workers.models import ModelCard
from medray.workers.specs import TrainSpec

log = logging.getLogger(__name__)
# Ray Train's controller notices that the workers finished (or failed) at its next health check:
# every 2 s by default, about 1.4 s of a small job's end on 2 cores (BENCHMARKS.md "Start-up");
# a check is one small call per worker
HEALTH_CHECK_S = 0.5
# the spec fields a model card lists as its hyperparameters
_HYPERPARAMETERS = {"epochs", "batch_size", "learning_rate", "workers", "cpus_per_worker",
                    "gpus_per_worker", "mode", "augment", "augment_recipe", "class_weights",
                    "seed", "patience"}


def run(spec: TrainSpec, lake: Lake, ctx: JobContext) -> dict[str, Any]:
    """Train (or continue training) and register; the job's result for the CLI."""
    started = time.monotonic()
    name, version, manifest = catalog.resolve(lake, spec.dataset)
    facts = DatasetFacts.from_manifest(name, version, manifest)
    spec = _for_images(spec, facts.image_size)
    precheck.check(spec, lake)
    train_id, has_checkpoints = checkpoints.choose_training(lake, spec, ctx.job_id)
    log.info("training id %s (continue it with --resume --run-id %s)", train_id, train_id)
    done = lake.read_json_or_none(layout.training_registered(spec.model, train_id))
    if done:
        log.info("training %s already finished as %s:%s; nothing to do", train_id,
                 done["model"], done["version"])
        return dict(done)
    changed = _record_spec(lake, spec, facts, train_id, has_checkpoints)

    rows = data.count_rows(lake, manifest, list(facts.labels))
    if rows.val_split == "test":
        log.warning("no labelled val split: validating (and choosing thresholds) on test")
    plan = _plan(lake, spec, ctx, facts, train_id, rows)
    card_text = precheck.card_file(spec)
    _check_resources(spec)
    shards = [s["path"] for s in manifest["shards"]]
    features: FeatureCache | None = None
    if spec.mode == "head" and plan.augment is None:
        features = ensure_features(lake, spec, plan.shape, plan.init, shards, ctx.job_id)
        plan = replace(plan, feature_dim=features.dim)
    held = _fit(lake, plan, list(features.files) if features else shards)
    final = lake.read_json_or_none(layout.training_result(spec.model, train_id))
    if final is None:
        raise InputError("training ended without a final model (see the worker logs)")
    restarted = restarts.summary(lake, spec.model, train_id, ctx.job_id)
    if restarted["restarts"]:
        log.warning("training %s: restarted %d time(s) (a lost node, or storage trouble that "
                    "passed), resuming from the checkpoints of epochs %s", train_id,
                    restarted["restarts"], restarted["resumed_from_epochs"])
    result = _register(lake, plan, final, features, changed, started,
                       _training_data(facts, rows), card_text, restarted)
    if held is not None:  # for the job's usage (jobs/entry.py), not the CLI
        result["driver_held"] = held.usage()
    return result


def _for_images(spec: TrainSpec, image_size: int) -> TrainSpec:
    """The spec with the defaults that depend on the images resolved (``TrainSpec.for_images``),
    logged where they were left to medray."""
    resolved = spec.for_images(image_size)
    if spec.augment and spec.augment_recipe != resolved.augment_recipe:
        log.info("augmentation: %s (--augment-recipe auto, for %d px images)",
                 resolved.augment_recipe, image_size)
    if spec.calibrate and spec.calibration_form is None:
        after = f"the {resolved.augment_recipe} recipe" if spec.augment else "no augmentation"
        log.info("calibration form: %s (the default after %s)", resolved.calibration_form,
                 after)
    return resolved


def _training_data(facts: DatasetFacts, rows: data.RowCounts) -> dict[str, Any]:
    """The card's training data: the dataset version and its labelled images by split and
    label."""
    return {"dataset": facts.name, "version": facts.version,
            "splits": {split: {"images": n, "labels": rows.by_split.get(split, {})}
                       for split, n in sorted(rows.splits.items())}}


def _record_spec(lake: Lake, spec: TrainSpec, facts: DatasetFacts, train_id: str,
                 has_checkpoints: bool) -> list[str]:
    """Write spec.json for a training that has not started; for one that has, check that the
    resumed spec is the same model and return the settings it changes."""
    described = facts.describe(spec)
    path = layout.training_spec(spec.model, train_id)
    saved = lake.read_json_or_none(path)
    if saved and has_checkpoints:
        changed = checkpoints.check_resume(saved, described, train_id)
        if changed:
            log.info("resuming with changed settings: %s", changed)
        return changed
    lake.write_json(path, described)
    return []


def _plan(lake: Lake, spec: TrainSpec, ctx: JobContext, facts: DatasetFacts, train_id: str,
          rows: data.RowCounts) -> TrainPlan:
    """Everything the workers need, failing here (not in Ray) on what would fail there."""
    tr.plan_batches(rows.train, spec.batch_size, spec.workers)
    weights = None
    if spec.class_weights == "auto":
        pos, neg = tr.class_weights(rows.positives, facts.labels, rows.train, facts.multi_label)
        weights = (tuple(pos.tolist()), tuple(neg.tolist()))
    init = resolve_weights(lake, spec.weights, spec.model, train_id)
    plan = TrainPlan(spec=spec, lake_uri=lake.uri, job_id=ctx.job_id, train_id=train_id,
                     data=facts, train_rows=rows.train, val_split=rows.val_split, init=init,
                     class_weights=weights)
    if init.kind == "imagenet":  # the real Keras download, here once, so it fails fast
        from medray.workers.models import build_model

        shape = plan.shape
        build_model(shape.arch, shape.image_size, shape.channels, shape.n_labels,
                    shape.multi_label, weights="imagenet")
    return plan


def _check_resources(spec: TrainSpec) -> None:
    """ConfigError naming the fix when the workers (plus the shard readers) cannot fit."""
    import ray

    # an autoscaling cluster counts the nodes it can add: its workers start at zero
    total = autoscale.reachable_resources(ray.cluster_resources())
    need_cpu = spec.workers * spec.cpus_per_worker + data.READER_CPUS
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"{spec.workers} worker(s) x {spec.cpus_per_worker} CPU plus {data.READER_CPUS} CPU "
            f"for the data readers need {need_cpu:g} CPUs; the cluster has "
            f"{total.get('CPU', 0):g}: lower --workers or --cpus-per-worker (e.g. 0.5), or add "
            "nodes")
    need_gpu = spec.workers * spec.gpus_per_worker
    if need_gpu and total.get("GPU", 0) < need_gpu:
        raise ConfigError(f"--gpus-per-worker {spec.gpus_per_worker} x {spec.workers} "
                          f"workers needs {need_gpu:g} GPUs; the cluster has "
                          f"{total.get('GPU', 0):g}")


def _fit(lake: Lake, plan: TrainPlan, files: list[str]) -> in_driver.Held | None:
    """Run the workers over ``files`` (image shards, or feature files for a cached head); what
    this driver held to train itself, if it did."""
    # Ray Train v2's own classes: what ray.train gives at run time (the type checker sees v1's)
    from ray.train import DataConfig
    from ray.train.v2.api.config import RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from medray.cluster.train.backend import TensorflowBackendConfig
    from medray.cluster.train.remote import train_loop

    # Ray Train hands this from the driver's environment to its controller; a cluster's own wins
    os.environ.setdefault(env.RAY_TRAIN_HEALTH_CHECK, str(HEALTH_CHECK_S))
    spec, facts = plan.spec, plan.data
    labels = list(facts.labels)
    train_ds = data.dataset(files, data.reader_for(plan.cached), lake, "train", labels,
                            facts.multi_label)
    plan = replace(plan, val_files=tuple(files))  # rank 0 reads its validation rows itself
    gpus = spec.gpus_per_worker
    run_config = RunConfig(name=f"medray-{plan.train_id}-{plan.job_id}",
                           storage_path=str(Path(tempfile.gettempdir()) / "medray-train"),
                           failure_config=restarts.failure_config(),
                           callbacks=[restarts.FailFast()])
    with in_driver.hold(spec) as held:
        # one CPU worker: the loop runs in this driver (Ray Train's local mode, num_workers=0)
        # on CPUs held on its node; otherwise on Ray Train's workers (in_driver.py)
        log.info("the training loop runs %s", f"in this job's driver ({held.cpus:g} CPU held)"
                 if held else f"on {spec.workers} Ray Train worker(s)")
        # medray's backend, not Ray's TensorflowTrainer: neither this driver (unless it trains)
        # nor Ray Train's controller imports TensorFlow (backend.py; BENCHMARKS.md "Start-up")
        trainer = DataParallelTrainer(
            train_loop,
            backend_config=TensorflowBackendConfig(),
            train_loop_config={PLAN: plan},
            scaling_config=ScalingConfig(
                num_workers=0 if held else spec.workers, use_gpu=bool(gpus),
                resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": gpus} if gpus
                                                                      else {})}),
            # the trainer's annotations name ray.train's classes, v1's to the type checker
            run_config=run_config,  # type: ignore[arg-type]
            datasets={"train": train_ds},
            dataset_config=DataConfig(datasets_to_split=["train"]),
        )
        try:
            if held:
                in_driver.fit(trainer.fit, _unwrap)
            else:
                trainer.fit()
        except Exception as exc:
            cause = _unwrap(exc)
            if cause is not exc:
                raise cause from exc
            raise
    return held


def _unwrap(exc: BaseException) -> BaseException:
    """The medray error a worker raised, out of Ray Train's wrappers (so bad input exits 2)."""
    found: MedrayError | None = restarts.medray_error(exc)
    return found if found is not None else exc


def _register(lake: Lake, plan: TrainPlan, final: dict[str, Any],
              features: FeatureCache | None, changed: list[str], started: float,
              training_data: dict[str, Any], card_text: dict[str, Any],
              restarted: dict[str, Any]) -> dict[str, Any]:
    """Register the final model as the next version, with its card; the job's result."""
    spec, facts, state = plan.spec, plan.data, final["state"]
    best = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]),
                state["history"][-1] if state["history"] else {})
    loss_weights = None
    if plan.class_weights is not None:
        loss_weights = {lab: {"positive": p, "negative": n}
                        for lab, p, n in zip(facts.labels, *plan.class_weights, strict=True)}
    card = ModelCard(
        name=spec.model, labels=list(facts.labels), multi_label=facts.multi_label,
        input_size=facts.image_size, channels=facts.channels, arch=spec.arch,
        thresholds=final["thresholds"], dataset=facts.name, dataset_version=facts.version,
        weights=plan.init.source,
        preprocessing="uint8 pixels in; scaling (and gray->RGB for ImageNet backbones) inside "
                      "the model",
        hyperparameters={
            **spec.model_dump(include=_HYPERPARAMETERS), "optimizer": "adam",
            "loss": "weighted binary cross-entropy (CheXNet)" if facts.multi_label
            else "weighted categorical cross-entropy",
            "loss_weights": loss_weights},
        metrics={"val_split": plan.val_split, "best_epoch": state["best_epoch"],
                 "val_mean_auroc": best.get("val_mean_auroc"), "val_loss": best.get("val_loss"),
                 "val_auroc": best.get("val_auroc"), "epochs_run": state["epoch"],
                 "stopped": state.get("stopped"), "history": state["history"]},
        training_seconds=round(sum(h.get("seconds", 0.0) for h in state["history"]), 1),
        code_version=_code_version(),
        training={"id": plan.train_id, "jobs": state.get("jobs", [plan.job_id]),
                  "resumed": len(state.get("jobs", [])) > 1, "changed_on_resume": changed,
                  "restarts": restarted["restarts"],
                  "resumed_from_epochs": restarted["resumed_from_epochs"],
                  "weights_identity": plan.init.identity,
                  "feature_cache": features.summary() if features else None,
                  "tensorboard": lake.full_uri(layout.training_board(spec.model, plan.train_id)),
                  "job_seconds": round(time.monotonic() - started, 1)},
        intended_use=model_card.intended_use(spec.intended_use, spec.out_of_scope, card_text),
        training_data=training_data, validation=final.get("validation") or {},
        calibration=final.get("calibration") or {},
        operating_points=final.get("operating_points") or [],
    )
    card.limitations = model_card.limitations(card, card_text.get("limitations"))
    if card_text.get("ethical_considerations"):
        card.ethical_considerations = [*card_text["ethical_considerations"],
                                       *card.ethical_considerations]
    cal = card.calibration
    if cal:
        log.info("calibration on %s: temperature %s, bias %s (%s); validation ECE %s before, "
                 "%s after", cal["fitted_on"], _rounded(cal["temperature"]),
                 _rounded(cal.get("bias") or {}), cal.get("asked", "temperature"),
                 _rounded(cal["ece_before"]), _rounded(cal["ece_after"]))
    for point in card.operating_points:
        log.info("operating point %s %s: threshold %.4g (%s sensitivity %s, specificity %s)",
                 point["label"], point["rule"], point["threshold"], point["chosen_on"],
                 _rounded(point.get(f"{point['chosen_on']}_sensitivity")),
                 _rounded(point.get(f"{point['chosen_on']}_specificity")))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / layout.MODEL_FILE
        path.write_bytes(lake.read_bytes(layout.training_model(spec.model, plan.train_id)))
        card = registry.register(lake, str(path), card)
    assert card.version is not None  # register() numbers the version
    log.info("registered %s:%s (best epoch %s, val mean AUROC %s)", card.name, card.version,
             state["best_epoch"], best.get("val_mean_auroc"))
    result = {"model": card.name, "version": card.version, "training_id": plan.train_id,
              "uri": lake.full_uri(layout.model_version(card.name, card.version)),
              "metrics": {"val_mean_auroc": best.get("val_mean_auroc"),
                          "val_auroc": best.get("val_auroc"), "best_epoch": state["best_epoch"],
                          "epochs_run": state["epoch"]},
              # the recipe used (--augment-recipe auto resolved for the images), or "off"
              "augmentation": spec.augment_recipe if spec.augment else "off",
              "calibration": {k: cal.get(k) for k in ("temperature", "bias", "form",
                                                       "ece_before", "ece_after")}
              if cal else None,
              "val_ece_before": model_card.mean_value(cal.get("ece_before")) if cal else None,
              "val_ece_after": model_card.mean_value(cal.get("ece_after")) if cal else None,
              "thresholds": card.thresholds,
              "operating_points": [{k: p[k] for k in ("label", "rule", "threshold", "primary")}
                                   for p in card.operating_points],
              "features": card.training.get("feature_cache"),
              # worker groups restarted in this job (a node lost), and the epochs they resumed
              "restarts": restarted["restarts"],
              "resumed_from_epochs": restarted["resumed_from_epochs"]}
    lake.write_json(layout.training_registered(spec.model, plan.train_id), result)
    return result


def _rounded(value: Any) -> Any:
    """Numbers (alone or as dict values) at 4 significant digits, for log lines."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return f"{value:.4g}" if isinstance(value, float) else value


def _code_version() -> str:
    try:
        from importlib.metadata import version

        return f"medray {version('medray')}"
    except Exception:  # noqa: BLE001 - a card without a version is still a card
        return "medray (unknown)"
