"""What the driver decides before training starts, handed whole to every training worker.

The driver resolves the dataset, the training id, the initial weights, the class weights and
the feature cache once; the workers only read the result. Ray Train's ``train_loop_config``
must be a dict, so the plan travels as its one value (``{PLAN: plan}``) and is unwrapped at the
top of the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medray.cluster.store import layout
from medray.cluster.train.weights import InitWeights, ModelShape
from medray.workers.models import Augment, parse_augment
from medray.workers.specs import TrainSpec

PLAN = "plan"  # the key of the plan in train_loop_config


def driver_cpus(spec: TrainSpec) -> float:
    """The CPUs a training's job driver would hold to run the loop itself: a one-worker CPU
    training's worker's (``in_driver.py``); 0 for more workers or GPUs, which go to Ray Train's
    workers, placed where the cluster has them."""
    return spec.cpus_per_worker if spec.workers == 1 and not spec.gpus_per_worker else 0.0


@dataclass(frozen=True)
class DatasetFacts:
    """The dataset version a training reads, as its manifest describes it."""

    name: str
    version: int
    labels: tuple[str, ...]
    multi_label: bool
    image_size: int
    channels: int

    @classmethod
    def from_manifest(cls, name: str, version: int, manifest: dict[str, Any]) -> DatasetFacts:
        return cls(name, version, tuple(manifest["labels"]), bool(manifest["multi_label"]),
                   int(manifest["image_size"]), int(manifest["channels"]))

    def describe(self, spec: TrainSpec) -> dict[str, Any]:
        """The spec as a training records it (spec.json): the dataset reference resolved, and
        what a resumed training must not change."""
        return {**spec.model_dump(), "dataset": self.name, "dataset_version": self.version,
                "labels": list(self.labels), "multi_label": self.multi_label,
                "image_size": self.image_size, "channels": self.channels}


@dataclass(frozen=True)
class TrainPlan:
    spec: TrainSpec
    lake_uri: str
    job_id: str  # recorded in the checkpoints, the rank files and the result: who did what
    train_id: str
    data: DatasetFacts
    train_rows: int
    val_split: str
    init: InitWeights
    # (positive, negative) loss weight per label; None for --class-weights none
    class_weights: tuple[tuple[float, ...], tuple[float, ...]] | None
    # the size of the cached backbone features the head trains on; None: it trains on images
    feature_dim: int | None = None
    # the files rank 0 reads the validation split from (image shards or feature files)
    val_files: tuple[str, ...] = ()

    @property
    def run_dir(self) -> str:
        return layout.training(self.spec.model, self.train_id)

    @property
    def cached(self) -> bool:
        return self.feature_dim is not None

    @property
    def shape(self) -> ModelShape:
        return ModelShape(self.spec.arch, self.data.image_size, self.data.channels,
                          len(self.data.labels), self.data.multi_label, self.spec.seed)

    @property
    def augment(self) -> Augment | None:
        return parse_augment(self.spec.augment_recipe) if self.spec.augment else None

    @property
    def calibration_form(self) -> str:
        """The form training fits on validation: the spec's, which the job resolved for the
        dataset's images (``TrainSpec.for_images``) before planning."""
        if self.spec.calibration_form is None:
            raise RuntimeError("a training plan needs its spec resolved for the images "
                              "(TrainSpec.for_images): no calibration form")
        return self.spec.calibration_form
