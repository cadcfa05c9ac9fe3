"""The `medray` command line: the app, its job commands and the management groups.

A command parses, calls one SDK function and prints. Job options come from the spec classes
(``medray.jobs.flags``), so their defaults and help live only on the spec fields. Nothing heavy
is imported before a command runs, so `medray --help` loads neither TensorFlow nor Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from medray.jobs.cli_manage import COMMANDS, GROUPS
from medray.jobs.flags import ADDRESS, JSON, LAKE, WAIT, given, spec_argument, spec_option
from medray.jobs.output import call, emit, table
from medray.workers.specs import ReportSpec, ScoreSpec, StageSpec, TrainSpec

app = typer.Typer(
    help="Distributed batch scoring and retraining for medical images on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for _name, _group in GROUPS.items():
    app.add_typer(_group, name=_name)
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)

# the metrics a report prints, in this order, where any label has them
_REPORT_COLUMNS = (
    "label",
    "images",
    "positives",
    "auroc",
    "auroc_lo",
    "auroc_hi",
    "f1",
    "ece",
    "positive_rate",
    "drifted",
)


def _submit(kind: str, values: dict[str, Any], address: str | None, wait: bool) -> dict[str, Any]:
    from medray.jobs import sdk

    return call(lambda: sdk.submit(kind, values, address=address, wait=wait, on_log=sdk.stderr_log))


def _local_path(value: str) -> str:
    """A local path made absolute here: the job runs in another working directory."""
    return str(Path(value).resolve())


# ---------------------------------------------------------------- jobs
# A job command's parameters declare its options; ``given`` reads the ones the user set, so a
# parameter the body does not use is still the option that fills its spec field.
@app.command()
def stage(
    ctx: typer.Context,
    source: str = spec_argument(StageSpec, "source"),
    dataset: str = spec_option(StageSpec, "dataset", "-d"),
    fmt: str = spec_option(StageSpec, "format"),
    image_size: int = spec_option(StageSpec, "image_size"),
    channels: int = spec_option(StageSpec, "channels"),
    shard_mb: float = spec_option(StageSpec, "shard_mb"),
    keep_original: bool = spec_option(StageSpec, "keep_original"),
    val_percent: float = spec_option(StageSpec, "val_percent"),
    test_percent: float = spec_option(StageSpec, "test_percent"),
    max_errors: str = spec_option(StageSpec, "max_errors"),
    label_names: str = spec_option(
        StageSpec, "label_names", help="Comma-separated class names for .npz labels."
    ),
    path_column: str = spec_option(StageSpec, "path_column"),
    label_column: str = spec_option(StageSpec, "label_column"),
    label_sep: str = spec_option(StageSpec, "label_sep"),
    no_finding: str = spec_option(StageSpec, "no_finding"),
    patient_column: str = spec_option(StageSpec, "patient_column"),
    images_root: str = spec_option(StageSpec, "images_root"),
    split_column: str = spec_option(StageSpec, "split_column"),
    max_pixels: int = spec_option(StageSpec, "max_pixels"),
    retain: list[str] = spec_option(StageSpec, "retain"),
    clean: list[str] = spec_option(StageSpec, "clean"),
    allow_burned_in: bool = spec_option(StageSpec, "allow_burned_in"),
    reuse: bool = spec_option(StageSpec, "reuse"),
    linkage: str = spec_option(StageSpec, "linkage"),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Stage images into a new dataset version (shards + manifest) in the lake."""
    values = given(ctx, StageSpec)
    names = values.pop("label_names", None)
    if names:
        values["label_names"] = names.split(",")
    if "://" not in source and Path(source).exists():
        values["source"] = _local_path(source)
    for key in ("images_root", "linkage"):
        path = values.get(key)
        if path and "://" not in path:
            values[key] = _local_path(path)
    res = _submit("stage", values, address, wait)
    emit(
        res,
        as_json,
        None
        if not wait
        else f"staged {res.get('dataset')}:{res.get('version')}: {res.get('images')} images, "
        f"{res.get('duplicates', 0)} duplicates, {res.get('errors')} errors -> {res.get('uri')}",
    )


@app.command()
def train(
    ctx: typer.Context,
    dataset: str = spec_option(TrainSpec, "dataset", "-d"),
    model: str = spec_option(TrainSpec, "model", "-m"),
    arch: str = spec_option(TrainSpec, "arch"),
    epochs: int = spec_option(TrainSpec, "epochs"),
    batch_size: int = spec_option(TrainSpec, "batch_size"),
    learning_rate: float = spec_option(TrainSpec, "learning_rate"),
    workers: int = spec_option(TrainSpec, "workers"),
    cpus_per_worker: float = spec_option(TrainSpec, "cpus_per_worker"),
    gpus_per_worker: float = spec_option(TrainSpec, "gpus_per_worker"),
    weights: str = spec_option(TrainSpec, "weights"),
    mode: str = spec_option(TrainSpec, "mode"),
    augment: bool = spec_option(TrainSpec, "augment"),
    class_weights: str = spec_option(TrainSpec, "class_weights"),
    patience: int = spec_option(TrainSpec, "patience"),
    resume: bool = spec_option(TrainSpec, "resume"),
    run_id: str = spec_option(TrainSpec, "run_id"),
    seed: int = spec_option(TrainSpec, "seed"),
    calibrate: bool = spec_option(TrainSpec, "calibrate"),
    operating_point: str = spec_option(TrainSpec, "operating_point"),
    intended_use: str = spec_option(TrainSpec, "intended_use"),
    out_of_scope: str = spec_option(TrainSpec, "out_of_scope"),
    card_file: str = spec_option(TrainSpec, "card_file"),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Train on Ray Train (TensorFlow, MultiWorkerMirroredStrategy); registers a model version."""
    values = given(ctx, TrainSpec)
    for key in ("weights", "card_file"):
        local = values.get(key)
        if local and Path(local).exists():
            values[key] = _local_path(local)
    res = _submit("train", values, address, wait)
    auc = (res.get("metrics") or {}).get("val_mean_auroc")
    ece = ""
    if res.get("val_ece_before") is not None:
        ece = (f", validation ECE {res['val_ece_before']:.4f} before calibration, "
               f"{res['val_ece_after']:.4f} after")
    emit(
        res,
        as_json,
        None
        if not wait
        else f"registered {res.get('model')}:{res.get('version')} (validation mean AUROC "
        f"{auc if auc is None else round(auc, 4)}{ece}) -> {res.get('uri')}",
    )


@app.command()
def score(
    ctx: typer.Context,
    dataset: str = spec_option(ScoreSpec, "dataset", "-d"),
    model: str = spec_option(ScoreSpec, "model", "-m"),
    split: str = spec_option(ScoreSpec, "split"),
    run_id: str = spec_option(ScoreSpec, "run_id"),
    actors: int = spec_option(ScoreSpec, "actors"),
    batch_size: int = spec_option(ScoreSpec, "batch_size"),
    cpus_per_actor: float = spec_option(ScoreSpec, "cpus_per_actor"),
    gpus_per_actor: float = spec_option(ScoreSpec, "gpus_per_actor"),
    allow_cpu: bool = spec_option(ScoreSpec, "allow_cpu"),
    only_new: bool = spec_option(ScoreSpec, "only_new"),
    retry_failed: str = spec_option(ScoreSpec, "retry_failed"),
    mixed_precision: bool = spec_option(ScoreSpec, "mixed_precision"),
    partition_by: str = spec_option(ScoreSpec, "partition_by"),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Score a dataset with a model version into a committed run of prediction tables."""
    res = _submit("score", given(ctx, ScoreSpec), address, wait)
    emit(
        res,
        as_json,
        None
        if not wait
        else f"run {res.get('run_id')}: {res.get('images')} images scored, {res.get('errors')} "
        f"errors\npredictions: {res.get('predictions_uri')}\nerrors:      "
        f"{res.get('errors_uri')}",
    )


@app.command()
def report(
    ctx: typer.Context,
    run_id: str = spec_argument(ReportSpec, "run_id"),
    reference: str = spec_option(ReportSpec, "reference"),
    compare: str = spec_option(ReportSpec, "compare"),
    heatmaps: int = spec_option(ReportSpec, "heatmaps"),
    n_boot: int = spec_option(ReportSpec, "n_boot"),
    drift_psi: float = spec_option(ReportSpec, "drift_psi"),
    heatmap_layer: str = spec_option(ReportSpec, "heatmap_layer"),
    subgroups: str = spec_option(ReportSpec, "subgroups"),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Metrics for a run: per-label AUROC and more, as Parquet tables and a terminal table."""
    res = _submit("report", given(ctx, ReportSpec), address, wait)
    if as_json or not wait:
        emit(res, as_json)
        return
    rows = [{"label": k, **v} for k, v in (res.get("metrics") or {}).items()]
    typer.echo(table(rows, [c for c in _REPORT_COLUMNS if any(c in r for r in rows)]))
    summary = res.get("summary") or {}
    if summary.get("heatmaps_note"):
        typer.echo(summary["heatmaps_note"])
    if summary.get("flagged_gaps"):
        typer.echo(f"subgroup gaps whose 95% interval excludes zero: {summary['flagged_gaps']} "
                   "(see the report's Subgroups section)")
    typer.echo(f"report: {res.get('report_uri')}")
    if res.get("html_uri"):
        typer.echo(f"html:   {res.get('html_uri')}")


@app.command()
def submit(
    spec_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A YAML job spec."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set epochs=3."),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Submit a YAML job spec (kind: stage|train|score|report); CLI > env > spec > defaults."""
    from medray.jobs.specfile import load_spec_file

    kind, values = call(lambda: load_spec_file(spec_file, set_, lake))
    emit(_submit(kind, values, address, wait), as_json)


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False),
    model: str = typer.Option(..., "--model", "-m", help="NAME, NAME:VERSION or NAME@ALIAS."),
    top: int = typer.Option(5, help="Labels to print per image."),
    lake: str = LAKE,
    as_json: bool = JSON,
) -> None:
    """Quick local look: `label (score = 0.91144)` lines, highest first."""
    from medray.jobs import sdk

    results = call(lambda: sdk.predict([str(p) for p in images], model, lake))
    if as_json:
        emit(results, True)
        return
    for path, scores in results.items():
        if len(results) > 1:
            typer.echo(f"{path}:")
        for label, value in scores[:top]:
            typer.echo(f"{label} (score = {value:.5f})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
