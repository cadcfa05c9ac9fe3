"""Job specs: frozen, validated data. Built from CLI flags > environment > YAML > defaults.

Every kind of job has one spec class; the entrypoint on the cluster receives it as JSON.
Unknown keys are rejected with a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from medray.workers.errors import ConfigError

# the mark of a field a job sizes to its cluster when the user leaves it unset: the command
# line shows "sized to the cluster" as its default (jobs/flags.py)
SIZED_TO_THE_CLUSTER: dict[str, Any] = {"default_shown": "sized to the cluster"}
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
    source: str = Field(
        description="Folder tree, .npz, CSV/TSV manifest or DICOM folder; local or s3://."
    )
    dataset: str = Field(description="Dataset name.")
    format: Literal["auto", "folder", "npz", "csv", "dicom"] = Field(
        default="auto", description="auto|folder|npz|csv|dicom"
    )
    image_size: int = Field(
        default=128, ge=8, le=1024, description="Square size of the staged pixels."
    )
    channels: Literal[1, 3] = Field(default=1, description="1 (gray) or 3 (RGB).")
    shard_mb: float = Field(default=128.0, gt=0, le=4096, description="Target shard size in MB.")
    keep_original: bool = Field(
        default=False, description="Also keep the (de-identified) original bytes."
    )
    val_percent: float = Field(
        default=10.0,
        ge=0,
        le=50,
        description="Validation share by patient when the source has no splits.",
    )
    test_percent: float = Field(default=10.0, ge=0, le=50, description="Test share by patient.")
    max_errors: str = Field(
        default="10%", description="Fail when more inputs fail: a count or a percent."
    )
    label_names: list[str] | None = Field(
        default=None, description="Class names for .npz labels, in label order."
    )
    # CSV/TSV manifests (ChestX-ray14's Data_Entry_2017.csv by default)
    path_column: str = Field(default="Image Index", description="CSV image path column.")
    label_column: str = Field(default="Finding Labels", description="CSV label column.")
    label_sep: str = Field(default="|", description="CSV multi-label separator.")
    no_finding: str = Field(
        default="No Finding", description="CSV value meaning no positive label."
    )
    patient_column: str | None = Field(default="Patient ID", description="CSV patient column.")
    images_root: str | None = Field(
        default=None, description="Where CSV paths resolve (default: the CSV's folder)."
    )
    attributes: str = Field(
        default="auto",
        description="CSV columns kept as typed patient attributes for subgroup reports: auto "
        "(age, sex/gender, view position where present), none, or a comma-separated list. "
        "Identifying columns (names, IDs, dates) are refused.",
    )
    split_column: str | None = Field(
        default=None,
        description="CSV column giving each image's split (train|val|test; empty: by patient).",
    )
    max_pixels: int = Field(
        default=50_000_000,
        gt=0,
        description="Refuse images of more pixels than this (decompression bombs).",
    )
    decode_batch: int = Field(
        default=32, ge=1, le=4096, description="Target inputs per decoding batch."
    )
    # de-identification of DICOM (docs/deid.md)
    retain: list[Literal["patient-characteristics", "longitudinal", "manufacturer"]] = Field(
        default=[],
        description="Keep what the DICOM profile removes: patient-characteristics (sex, age, "
        "size, weight), longitudinal (dates shifted per patient), manufacturer. Repeatable.",
    )
    clean: list[Literal["descriptors"]] = Field(
        default=[],
        description="Keep DICOM descriptions cleaned of names, IDs and dates: descriptors.",
    )
    allow_burned_in: bool = Field(
        default=False,
        description="Stage DICOM that may carry burned-in text (else: an errors row).",
    )
    reuse: bool = Field(
        default=True, description="Reuse the previous version's shards (--no-reuse: re-stage all)."
    )
    linkage: str | None = Field(
        default=None,
        description="Where the DICOM path linkage goes (default: MEDRAY_HOME, 0600).",
    )
    # a DICOMweb source (dicomweb://HOST[:PORT]/PATH, docs/pacs.md)
    study_date: str | None = Field(
        default=None, description="DICOMweb: studies dated FROM-TO (YYYYMMDD-YYYYMMDD)."
    )
    modality: str | None = Field(
        default=None, description="DICOMweb: only these modalities, comma-separated (CR,DX)."
    )
    since_last: bool = Field(
        default=False,
        description="DICOMweb: only instances no earlier version of the dataset staged.",
    )
    qido: list[str] = Field(
        default=[],
        description="DICOMweb: a raw QIDO-RS filter KEY=VALUE (non-identifying). Repeatable.",
    )
    auth_file: str | None = Field(
        default=None,
        description="DICOMweb: file (mode 0600, read where the job runs) holding user:password "
        "or Bearer TOKEN; default: MEDRAY_DICOMWEB_AUTH on the cluster's nodes.",
    )

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str) -> str:
        return check_name(v, "dataset")

    @model_validator(mode="after")
    def _dicomweb(self) -> StageSpec:
        from medray.workers import dicomweb

        web = dicomweb.is_dicomweb(self.source)
        given = [f for f in ("study_date", "modality", "since_last", "qido", "auth_file")
                 if getattr(self, f)]
        if given and not web:
            raise ValueError(f"{', '.join(given)} apply to a dicomweb:// source only")
        if web:
            try:
                dicomweb.parse_endpoint(self.source)
                if self.study_date:
                    dicomweb.parse_date_range(self.study_date)
                if self.modality:
                    dicomweb.parse_modalities(self.modality)
                dicomweb.parse_qido_filters(self.qido)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
            if self.format not in ("auto", "dicom"):
                raise ValueError("a dicomweb:// source is DICOM: leave --format auto")
        return self

    @field_validator("max_errors")
    @classmethod
    def _max_errors(cls, v: str) -> str:
        # imported here: shards pulls in numpy and pyarrow, which `medray --help` must not pay
        from medray.workers.shards import parse_max_errors

        parse_max_errors(v, 1)
        return v


class TrainSpec(JobSpec):
    kind: Literal["train"] = "train"
    dataset: str = Field(description="NAME or NAME:VERSION.")
    model: str = Field(description="Model name to register.")
    arch: str = Field(
        default="small_cnn",
        description="small_cnn|mobilenet_v2|efficientnet_b0|densenet121|inception_v3",
    )
    epochs: int = Field(default=12, ge=1, le=1000, description="Maximum epochs.")
    batch_size: int = Field(default=64, ge=1, le=8192, description="Global batch size.")
    learning_rate: float = Field(default=2e-3, gt=0, le=1, description="Adam learning rate.")
    workers: int = Field(default=1, ge=1, le=512, description="Ray Train workers.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs per worker.")
    gpus_per_worker: float = Field(default=0.0, ge=0, description="GPUs per worker.")
    weights: str = Field(
        default="none", description="none|imagenet|PATH.keras|PATH.weights.h5|MODEL:VERSION"
    )
    mode: Literal["full", "head"] = Field(default="full", description="full|head")
    augment: bool | None = Field(
        default=None, json_schema_extra={"default_shown": "on in full mode, off in head mode"},
        description="Training-time augmentation: random crops, rotations and brightness "
        "changes, as --augment-recipe says (unset: on in full mode, or where a recipe is given; "
        "off in head mode, which trains on cached backbone features).",
    )
    augment_recipe: str = Field(
        default="auto",
        description="What --augment does: auto (strong below 128 px, light from 128 px), "
        "light (small crops, rotations and brightness changes), strong (crop 0.25, rotation "
        "0.08, brightness 0.3), or a list such as crop=0.25,rotation=0.02 (only the transforms "
        "named).",
    )
    class_weights: Literal["auto", "none"] = Field(default="auto", description="auto|none")
    patience: int = Field(default=4, ge=1, description="Early-stopping patience in epochs.")
    resume: bool = Field(
        default=False, description="Continue from the last checkpoint of --run-id."
    )
    seed: int = Field(default=0, description="Random seed.")
    run_id: str | None = Field(default=None, description="Training run id (for --resume).")
    calibrate: bool = Field(
        default=True, description="Fit temperature scaling on validation (scores calibrated)."
    )
    calibration_form: Literal["temperature", "temperature+bias", "temperature+balanced-bias",
                              "auto"] | None = Field(
        default=None,
        json_schema_extra={"default_shown": "temperature+balanced-bias after strong or "
                           "another recipe that crops 0.15 or more, else temperature"},
        description="temperature: one temperature (validation's prevalence stays out of the "
        "scores); temperature+bias: a bias per class/label too, for validation drawn like the "
        "data to score; temperature+balanced-bias: that bias fitted with the classes weighted "
        "equally (a shift of the model's is undone, validation's prevalence stays out); auto: "
        "the plain bias where 2-fold cross-fitting on validation keeps it.",
    )
    operating_point: str = Field(
        default="youden",
        description="Threshold rules chosen on validation: youden, sensitivity=0.95, "
        "specificity=0.90, comma-separated, LABEL:RULE for one label; the first is used.",
    )
    intended_use: str | None = Field(
        default=None, description="Model card: intended use (default: research use only)."
    )
    out_of_scope: str | None = Field(
        default=None, description="Model card: out-of-scope uses, ';'-separated."
    )
    card_file: str | None = Field(
        default=None,
        description="Model card text: YAML/JSON with intended_use, out_of_scope, users, "
        "limitations, ethical_considerations.",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_name(v, "model name")

    @model_validator(mode="before")
    @classmethod
    def _augment_by_mode(cls, data: Any) -> Any:
        """Unset --augment is decided here, so that every record of the spec (the training's
        spec file, resume checks, the card's hyperparameters) holds what was used."""
        if isinstance(data, dict) and data.get("augment") is None:
            # a recipe given asks for augmentation, in head mode too
            data = {**data, "augment": data.get("mode", "full") != "head"
                    or data.get("augment_recipe") is not None}
        return data

    @field_validator("augment_recipe")
    @classmethod
    def _augment_recipe(cls, v: str) -> str:
        """One spelling per recipe (a preset's name, or the list written out in full), so that
        resume checks compare recipes, not how they were typed."""
        from medray.workers.models import canonical_augment

        try:
            return canonical_augment(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from None

    @model_validator(mode="after")
    def _recipe_needs_augment(self) -> TrainSpec:
        if not self.augment and self.augment_recipe not in ("auto", "light"):
            raise ValueError(f"--augment-recipe {self.augment_recipe} with --no-augment: give "
                             "one of them")
        return self

    def for_images(self, image_size: int) -> TrainSpec:
        """The spec as a training on images of ``image_size`` px runs it, so that every record
        of it (spec.json, resume checks, the card) holds what was used: ``--augment-recipe
        auto`` becomes a preset by the side (``models.recipe_for``), and an unset
        ``--calibration-form`` the class-balanced bias after a recipe whose crop lowers the
        scores of clean images (``models.shifts_scores``), else the temperature alone."""
        from medray.workers.calibration import BALANCED, TEMPERATURE
        from medray.workers.models import recipe_for, shifts_scores

        recipe = recipe_for(self.augment_recipe, image_size) if self.augment else "light"
        form = self.calibration_form or (
            BALANCED if self.augment and shifts_scores(recipe) else TEMPERATURE)
        return self.model_copy(update={"augment_recipe": recipe, "calibration_form": form})

    @field_validator("operating_point")
    @classmethod
    def _operating_point(cls, v: str) -> str:
        from medray.workers.operating_points import parse

        try:
            parse(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return v

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "run id")


class ScoreSpec(JobSpec):
    kind: Literal["score"] = "score"
    dataset: str = Field(description="NAME or NAME:VERSION.")
    model: str = Field(description="NAME, NAME:VERSION or NAME@ALIAS.")
    split: str | None = Field(default=None, description="Only this split (train|val|test).")
    run_id: str | None = Field(
        default=None, description="Run id; the same id resumes an unfinished run."
    )
    # unset, these three are chosen by the score job for the cluster it lands on
    # (cluster/score/sizing.py); the defaults below are what a spec shows when read elsewhere
    actors: int = Field(default=1, ge=1, le=4096, json_schema_extra=SIZED_TO_THE_CLUSTER,
                        description="Scorer actors (unset: one per node with free CPUs, or "
                                    "one per GPU the cluster has or can add).")
    batch_size: int = Field(default=256, ge=1, le=65536, json_schema_extra=SIZED_TO_THE_CLUSTER,
                            description="Rows per scorer batch (unset: 256, fewer when a "
                                        "batch would not fit the memory free per actor).")
    cpus_per_actor: float = Field(default=1.0, gt=0, json_schema_extra=SIZED_TO_THE_CLUSTER,
                                  description="CPUs per actor, TensorFlow's threads on CPU "
                                              "(unset: the smallest node's free CPUs).")
    gpus_per_actor: float = Field(default=0.0, ge=0, description="Whole GPUs per actor.")
    allow_cpu: bool = Field(default=False, description="Score on CPU when the cluster has no GPU.")
    only_new: bool = Field(
        default=False, description="Skip images already scored by this model version."
    )
    retry_failed: str | None = Field(
        default=None, description="Re-score the failed images of this run id."
    )
    mixed_precision: bool = Field(default=False, description="float16 compute on GPUs.")
    partition_by: Literal["none", "date"] = Field(default="none", description="none|date")

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
    run_id: str = Field(description="A committed run id.")
    reference: str | None = Field(default=None, description="Reference run for drift (PSI, KS).")
    compare: str | None = Field(default=None, description="Another model's run on the same images.")
    heatmaps: int = Field(
        default=0, ge=0, le=100, description="Grad-CAM overlays for the K top images per label."
    )
    n_boot: int = Field(default=1000, ge=0, le=100_000, description="Bootstrap resamples for CIs.")
    drift_psi: float = Field(
        default=0.2,
        gt=0,
        description="PSI above which a label is flagged as drifted (with KS p < 0.01).",
    )
    heatmap_layer: str | None = Field(
        default=None, description="Grad-CAM layer name (default: the last conv feature map)."
    )
    subgroups: str | None = Field(
        default=None,
        description="Patient attributes to break metrics down by, comma-separated (e.g. "
        "'Patient Age,Patient Gender,View Position'); default: those the dataset has; none.",
    )

    @field_validator("run_id", "reference", "compare")
    @classmethod
    def _run_ids(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "run id")


class PublishSpec(JobSpec):
    kind: Literal["publish"] = "publish"
    run_id: str = Field(description="A committed run id whose images were staged from DICOMweb.")
    to: str = Field(description="The DICOMweb service to store the SRs in: dicomweb://HOST/PATH.")
    auth_file: str | None = Field(
        default=None,
        description="File (mode 0600, read where the job runs) holding user:password or "
        "Bearer TOKEN; default: MEDRAY_DICOMWEB_AUTH on the cluster's nodes.",
    )
    linkage: str | None = Field(
        default=None, description="Where the staging's private linkage is (as given to stage)."
    )
    batch: int = Field(default=16, ge=1, le=500, description="SRs per STOW-RS request.")

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        return check_name(v, "run id")

    @field_validator("to")
    @classmethod
    def _to(cls, v: str) -> str:
        from medray.workers import dicomweb

        try:
            dicomweb.parse_endpoint(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from None
        return v


SPECS: dict[str, type[JobSpec]] = {
    "stage": StageSpec,
    "train": TrainSpec,
    "score": ScoreSpec,
    "report": ReportSpec,
    "publish": PublishSpec,
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
