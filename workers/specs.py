"""Job specs: frozen, validated data. Built from CLI flags > environment > YAML > defaults.

Every kind of job has one spec class; the entrypoint on the cluster receives it as JSON.
Unknown keys are rejected with a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medray.workers.errors import ConfigError
from medray.workers.shards import parse_max_errors

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(value: str, what: str) -> str:
    if not _NAME.match(value or ""):
        raise ValueError(
            f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return value


class JobSpec(BaseModel):
    """What every job spec has. The validated, frozen object travels whole from the CLI to the
    job's ``run(spec, lake, ctx)`` on the cluster (as JSON on the wire, re-validated there)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str
    lake: str = Field(default="", description="lake URI; empty = MEDRAY_LAKE or the default lake")


class StageSpec(JobSpec):
    kind: Literal["stage"] = "stage"
    source: str
    dataset: str
    format: Literal["auto", "folder", "npz", "csv", "dicom"] = "auto"
    image_size: int = Field(default=128, ge=8, le=1024)
    channels: Literal[1, 3] = 1
    shard_mb: float = Field(default=128.0, gt=0, le=4096)
    keep_original: bool = False
    val_percent: float = Field(default=10.0, ge=0, le=50)
    test_percent: float = Field(default=10.0, ge=0, le=50)
    max_errors: str = "10%"
    label_names: list[str] | None = None
    # CSV/TSV manifests (ChestX-ray14's Data_Entry_2017.csv by default)
    path_column: str = "Image Index"
    label_column: str = "Finding Labels"
    label_sep: str = "|"
    no_finding: str = "No Finding"
    patient_column: str | None = "Patient ID"
    images_root: str | None = None
    max_pixels: int = Field(default=50_000_000, gt=0)
    decode_batch: int = Field(default=32, ge=1, le=4096)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return check_name(v, "dataset")

    @field_validator("max_errors")
    @classmethod
    def _max_errors(cls, v: str) -> str:
        parse_max_errors(v, 1)
        return v


class TrainSpec(JobSpec):
    kind: Literal["train"] = "train"
    dataset: str
    model: str
    arch: str = "small_cnn"
    epochs: int = Field(default=12, ge=1, le=1000)
    batch_size: int = Field(default=64, ge=1, le=8192)
    learning_rate: float = Field(default=2e-3, gt=0, le=1)
    workers: int = Field(default=1, ge=1, le=512)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    weights: str = "none"
    mode: Literal["full", "head"] = "full"
    augment: bool = False
    class_weights: Literal["auto", "none"] = "auto"
    patience: int = Field(default=4, ge=1)
    resume: bool = False
    seed: int = 0
    run_id: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_name(v, "model name")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "run id")


class ScoreSpec(JobSpec):
    kind: Literal["score"] = "score"
    dataset: str
    model: str
    split: str | None = None
    run_id: str | None = None
    actors: int = Field(default=1, ge=1, le=4096)
    batch_size: int = Field(default=256, ge=1, le=65536)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpus_per_actor: float = Field(default=0.0, ge=0)
    allow_cpu: bool = False
    only_new: bool = False
    retry_failed: str | None = None
    mixed_precision: bool = False
    partition_by: Literal["none", "date"] = "none"

    @field_validator("run_id", "retry_failed")
    @classmethod
    def _run_ids(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "run id")

    @field_validator("gpus_per_actor")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        if v != int(v):
            raise ValueError("--gpus-per-actor takes whole GPUs (TensorFlow holds one GPU each)")
        return v


class ReportSpec(JobSpec):
    kind: Literal["report"] = "report"
    run_id: str
    reference: str | None = None
    compare: str | None = None
    heatmaps: int = Field(default=0, ge=0, le=100)
    n_boot: int = Field(default=1000, ge=0, le=100_000)
    drift_psi: float = Field(default=0.2, gt=0)

    @field_validator("run_id", "reference", "compare")
    @classmethod
    def _run_ids(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "run id")


SPECS: dict[str, type[JobSpec]] = {
    "stage": StageSpec,
    "train": TrainSpec,
    "score": ScoreSpec,
    "report": ReportSpec,
}


def build_spec(kind: str, values: dict[str, Any]) -> JobSpec:
    """Validate ``values`` as a spec of ``kind``; ConfigError with a fix on any problem."""
    if kind not in SPECS:
        raise ConfigError(f"unknown job kind {kind!r}{_suggest(kind, SPECS)}")
    cls = SPECS[kind]
    allowed = set(cls.model_fields)
    for key in values:
        if not isinstance(key, str):
            raise ConfigError(f"keys of a {kind} spec are names, not {key!r}")
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r} for a {kind} job{_suggest(key, allowed)}")
    try:
        return cls(**{k: v for k, v in values.items() if v is not None or k == "split"})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or kind}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid {kind} spec: {problems}") from None


def _suggest(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
