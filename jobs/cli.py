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
from medray.jobs.flags import (
    ADDRESS,
    JSON,
    LAKE,
    VERBOSE,
    WAIT,
    given,
    spec_argument,
    spec_option,
)
from medray.jobs.output import call, emit, open_in_browser, seconds, summary, table
from medray.workers.specs import PublishSpec, ReportSpec, ScoreSpec, StageSpec, TrainSpec

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


def _submit(kind: str, values: dict[str, Any], address: str | None, wait: bool,
            verbose: bool = False) -> dict[str, Any]:
    """Submit through the SDK; while it waits, the job's progress events are drawn on stderr
    (its full log too with ``--verbose``), and the bars end before any error is printed."""
    from medray.jobs import progress, sdk

    follow = progress.follower(verbose) if wait else None

    def run() -> dict[str, Any]:
        try:
            return sdk.submit(kind, values, address=address, wait=wait, on_log=follow)
        finally:
            if follow is not None:
                follow.close()

    return call(run)


def _early(res: dict[str, Any], as_json: bool) -> None:
    """What a job command prints instead of its summary: ``--json``'s one line, or what
    ``--no-wait`` submitted."""
    if as_json:
        emit(res, True)
    else:
        _submitted(res)


def _submitted(res: dict[str, Any]) -> None:
    """``--no-wait`` for people: the job id, the ids the job will use, how to follow it."""
    job = res.get("job_id")
    summary(f"submitted {job}", [(k.replace("_", " "), v) for k, v in res.items()
                                 if k not in ("job_id",)],
            next_steps=[f"medray jobs logs {job} --follow", f"medray jobs show {job}"])


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
    attributes: str = spec_option(StageSpec, "attributes"),
    split_column: str = spec_option(StageSpec, "split_column"),
    max_pixels: int = spec_option(StageSpec, "max_pixels"),
    retain: list[str] = spec_option(StageSpec, "retain"),
    clean: list[str] = spec_option(StageSpec, "clean"),
    allow_burned_in: bool = spec_option(StageSpec, "allow_burned_in"),
    reuse: bool = spec_option(StageSpec, "reuse"),
    linkage: str = spec_option(StageSpec, "linkage"),
    study_date: str = spec_option(StageSpec, "study_date"),
    modality: str = spec_option(StageSpec, "modality"),
    since_last: bool = spec_option(StageSpec, "since_last"),
    qido: list[str] = spec_option(StageSpec, "qido"),
    auth_file: str = spec_option(StageSpec, "auth_file"),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Stage images into a new dataset version (shards + manifest) in the lake."""
    values = given(ctx, StageSpec)
    names = values.pop("label_names", None)
    if names:
        values["label_names"] = names.split(",")
    if "://" not in source and Path(source).exists():
        values["source"] = _local_path(source)
    for key in ("images_root", "linkage", "auth_file"):
        path = values.get(key)
        if path and "://" not in path:
            values[key] = _local_path(path)
    res = _submit("stage", values, address, wait, verbose)
    if as_json or not wait:
        _early(res, as_json)
        return
    if res.get("nothing_new"):  # --since-last on a quiet night: no version was made
        summary(f"nothing new for {res.get('dataset')} since its last version", [])
        return
    ref = f"{res.get('dataset')}:{res.get('version')}"
    summary(f"staged {ref}", [
        ("images", res.get("images")), ("new", res.get("new_images")),
        ("reused", res.get("reused_images")), ("duplicates", res.get("duplicates")),
        ("errors", res.get("errors")), ("files read", res.get("files")),
        ("shards", res.get("shards")), ("time", seconds(res.get("seconds"))),
    ], [("data", res.get("uri")), ("errors", res.get("errors_uri"))],
        [f"medray train --dataset {ref} --model MODEL", f"medray datasets show {ref}"])


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
    augment_recipe: str = spec_option(TrainSpec, "augment_recipe"),
    class_weights: str = spec_option(TrainSpec, "class_weights"),
    patience: int = spec_option(TrainSpec, "patience"),
    resume: bool = spec_option(TrainSpec, "resume"),
    run_id: str = spec_option(TrainSpec, "run_id"),
    seed: int = spec_option(TrainSpec, "seed"),
    calibrate: bool = spec_option(TrainSpec, "calibrate"),
    calibration_form: str | None = spec_option(TrainSpec, "calibration_form"),
    operating_point: str = spec_option(TrainSpec, "operating_point"),
    intended_use: str = spec_option(TrainSpec, "intended_use"),
    out_of_scope: str = spec_option(TrainSpec, "out_of_scope"),
    card_file: str = spec_option(TrainSpec, "card_file"),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Train on Ray Train (TensorFlow, MultiWorkerMirroredStrategy); registers a model version."""
    values = given(ctx, TrainSpec)
    for key in ("weights", "card_file"):
        local = values.get(key)
        if local and Path(local).exists():
            values[key] = _local_path(local)
    res = _submit("train", values, address, wait, verbose)
    if as_json or not wait:
        _early(res, as_json)
        return
    metrics = res.get("metrics") or {}
    ref = f"{res.get('model')}:{res.get('version')}"
    from medray.workers.calibration import describe  # numpy: not on every CLI start

    summary(f"registered {ref}", [
        ("training id", res.get("training_id")),
        ("validation mean AUROC", metrics.get("val_mean_auroc")),
        ("best epoch", f"{metrics.get('best_epoch')} of {metrics.get('epochs_run')}"),
        ("augmentation", res.get("augmentation")),
        ("validation ECE before calibration", res.get("val_ece_before")),
        ("validation ECE after calibration", res.get("val_ece_after")),
        ("calibration", describe(res.get("calibration"))),
    ], [("model", res.get("uri"))],
        [f"medray score --dataset {dataset} --model {ref} --split test",
         f"medray models show {ref}"])


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
    publish_to: str = typer.Option(
        None, "--publish-to", help="Then publish the run's SRs there: " +
        str(PublishSpec.model_fields["to"].description)),
    publish_auth_file: str = typer.Option(
        None, "--publish-auth-file", help="For --publish-to: " +
        str(PublishSpec.model_fields["auth_file"].description)),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Score a dataset with a model version into a committed run of prediction tables."""
    publish: dict[str, Any] | None = None
    if publish_to:  # checked before scoring: a bad target costs no score job
        publish = {"to": publish_to, "lake": lake,
                   "auth_file": _local_path(publish_auth_file) if publish_auth_file else None}
        call(lambda: _check_publish(publish, wait))
    res = _submit("score", given(ctx, ScoreSpec), address, wait, verbose)
    if publish is not None:
        res["published"] = _submit("publish", {**publish, "run_id": res["run_id"]}, address,
                                   True, verbose)
    if as_json or not wait:
        _early(res, as_json)
        return
    summary(f"run {res.get('run_id')}", [
        ("images scored", res.get("images")), ("errors", res.get("errors")),
        ("model", f"{res.get('model')}:{res.get('model_version')}"),
        ("dataset", f"{res.get('dataset')}:{res.get('dataset_version')}"),
        ("shards", res.get("shards")), ("shards from earlier attempts", res.get("resumed_shards")
                                        or None),
        ("device", res.get("device")), ("time", seconds(res.get("seconds"))),
        ("SRs published", (res.get("published") or {}).get("published")),
    ], [("predictions", res.get("predictions_uri")), ("errors", res.get("errors_uri")),
        ("committed files", res.get("commit_uri"))],
        [f"medray report {res.get('run_id')}"])


def _check_publish(values: dict[str, Any], wait: bool) -> None:
    from medray.workers.errors import ConfigError
    from medray.workers.specs import build_spec

    if not wait:
        raise ConfigError("--publish-to publishes once the run is committed: drop --no-wait, "
                          "or run `medray publish RUN_ID --to ...` later")
    build_spec("publish", {**values, "run_id": "check"})


@app.command()
def publish(
    ctx: typer.Context,
    run_id: str = spec_argument(PublishSpec, "run_id"),
    to: str = spec_option(PublishSpec, "to"),
    auth_file: str = spec_option(PublishSpec, "auth_file"),
    linkage: str = spec_option(PublishSpec, "linkage"),
    batch: int = spec_option(PublishSpec, "batch"),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Store a scored run's results in a PACS: one DICOM SR per instance (docs/pacs.md)."""
    values = given(ctx, PublishSpec)
    for key in ("auth_file", "linkage"):
        path = values.get(key)
        if path and "://" not in path:
            values[key] = _local_path(path)
    res = _submit("publish", values, address, wait, verbose)
    if as_json or not wait:
        _early(res, as_json)
        return
    summary(f"published run {res.get('run_id')}", [
        ("SRs stored", res.get("published")), ("scored instances", res.get("instances")),
        ("rows not staged from DICOMweb", res.get("not_from_dicomweb")),
        ("model", f"{res.get('model')}:{res.get('model_version')}"),
    ], [("PACS", res.get("to"))], [])


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
    output: Path = typer.Option(
        None, "--output", "-o", file_okay=False,
        help="Folder for the local copy of the HTML report and its images "
        "(default: MEDRAY_HOME/reports/RUN_ID).",
    ),
    open_report: bool = typer.Option(
        False, "--open", help="Open the local report in the default browser, if there is one."
    ),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Metrics for a run: per-label AUROC and more, as Parquet tables, a terminal table and an
    HTML report, copied to a local folder (even from an S3 lake) that a browser opens."""
    from medray.jobs import sdk

    res = _submit("report", given(ctx, ReportSpec), address, wait, verbose)
    if wait:
        page = call(lambda: sdk.report_copy(run_id, lake, output))
        res["html_file"], res["html_url"] = str(page), page.as_uri()
    if as_json or not wait:
        _early(res, as_json)
        if wait and open_report:
            _open(page)
        return
    rows = [{"label": k, **v} for k, v in (res.get("metrics") or {}).items()]
    typer.echo(table(rows, [c for c in _REPORT_COLUMNS if any(c in r for r in rows)]))
    about = res.get("summary") or {}
    if about.get("heatmaps_note"):
        typer.echo(about["heatmaps_note"])
    if about.get("flagged_gaps"):
        typer.echo(f"subgroup gaps whose 95% interval excludes zero: {about['flagged_gaps']} "
                   "(see the report's Subgroups section)")
    typer.echo()
    summary(f"report {run_id}", [], [
        ("report", res["html_url"]), ("in the lake", res.get("html_uri")),
        ("tables", res.get("report_uri"))],
        [] if open_report else [f"medray report {run_id} --open   (or open the file:// link)"])
    if open_report:
        _open(page)


def _open(page: Path) -> None:
    why = open_in_browser(page)
    if why:  # not an error: the path is printed, any browser opens it
        typer.echo(f"not opened ({why}): {page.as_uri()}", err=True)


@app.command()
def submit(
    spec_file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A YAML job spec."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set epochs=3."),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
    verbose: bool = VERBOSE,
) -> None:
    """Submit a YAML job spec (kind: stage|train|score|report|publish); CLI > env > spec."""
    from medray.jobs.specfile import load_spec_file

    kind, values = call(lambda: load_spec_file(spec_file, set_, lake))
    emit(_submit(kind, values, address, wait, verbose), as_json)


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
