"""The `medray` command line. It parses, calls one SDK function and prints; nothing heavy is
imported before a command runs, so `medray --help` stays fast."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import typer

from medray.workers.jsonsafe import json_safe

app = typer.Typer(
    help="Distributed batch scoring and retraining for medical images on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cluster_app = typer.Typer(
    help="The local Ray cluster (head + Jobs API on 127.0.0.1).", no_args_is_help=True
)
lake_app = typer.Typer(help="The embedded S3 lake (SeaweedFS on 127.0.0.1).", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Jobs on the cluster and their history in the lake.", no_args_is_help=True
)
datasets_app = typer.Typer(help="Dataset versions in the lake.", no_args_is_help=True)
models_app = typer.Typer(help="Model versions and aliases in the lake.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
app.add_typer(lake_app, name="lake")
app.add_typer(jobs_app, name="jobs")
app.add_typer(datasets_app, name="datasets")
app.add_typer(models_app, name="models")

LAKE = typer.Option(
    None, "--lake", envvar="MEDRAY_LAKE", help="Lake URI: a path, file://... or s3://bucket/prefix."
)
ADDRESS = typer.Option(
    None,
    "--address",
    envvar="RAY_ADDRESS",
    help="Ray Jobs API address (default: the local cluster).",
)
JSON = typer.Option(False, "--json", help="Print one JSON object as the last stdout line.")
WAIT = typer.Option(True, "--wait/--no-wait", help="Follow the job until it ends.")


def _emit(obj: Any, as_json: bool, human: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(json_safe(obj), default=str))
    elif human is not None:
        typer.echo(human)
    else:
        typer.echo(json.dumps(json_safe(obj), indent=2, default=str))


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "-" if not math.isfinite(v) else f"{v:.4f}"
        if v is None:
            return "-"
        if isinstance(v, list | tuple):
            return ",".join(str(x) for x in v)
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _run(fn: Any) -> Any:
    """Run an SDK call; a medray error becomes its message and the exit code its class
    carries (2 bad usage, config or input; 1 a failed job or infrastructure)."""
    from medray.workers.errors import MedrayError

    try:
        return fn()
    except MedrayError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.exit_code) from None


def _submit(
    kind: str, values: dict[str, Any], address: str | None, wait: bool, as_json: bool
) -> dict[str, Any]:
    from medray.jobs import sdk

    result: dict[str, Any] = _run(
        lambda: sdk.submit(kind, values, address=address, wait=wait, on_log=sdk.stderr_log)
    )
    return result


# ---------------------------------------------------------------- cluster and lake
@cluster_app.command("up")
def cluster_up(
    nodes: int = typer.Option(1, help="Nodes on this machine: a head plus N-1 worker raylets."),
    num_cpus: int = typer.Option(None, help="CPUs per node (default: this machine's / nodes)."),
    num_gpus: int = typer.Option(None, help="GPUs per node (default: detected)."),
    config: Path = typer.Option(
        None,
        "--config",
        help="A Ray cluster launcher YAML: runs `ray up` for a cloud cluster instead.",
    ),
    as_json: bool = JSON,
) -> None:
    """Start the local Ray cluster (or a cloud one with --config)."""
    if config is not None:
        import subprocess

        raise typer.Exit(subprocess.call([_ray_cli(), "up", "-y", str(config)]))  # noqa: S603
    from medray.cluster.infra import ray_local

    info = _run(lambda: ray_local.up(nodes=nodes, num_cpus=num_cpus, num_gpus=num_gpus))
    _emit(
        info,
        as_json,
        f"Ray cluster up: {info.get('nodes')} node(s), {info.get('cpus')} CPUs, "
        f"{info.get('gpus')} GPUs; Jobs API at {info['dashboard_url']} (token auth on)",
    )


def _ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


@cluster_app.command("down")
def cluster_down() -> None:
    """Stop the local Ray cluster started by `medray cluster up`."""
    from medray.cluster.infra import ray_local

    typer.echo("Ray cluster stopped" if ray_local.down() else "no local Ray cluster was running")


@cluster_app.command("status")
def cluster_status(as_json: bool = JSON) -> None:
    """Nodes, CPUs and GPUs of the local cluster."""
    from medray.cluster.infra import ray_local

    info = ray_local.status()
    human = (
        "no local Ray cluster (start one with `medray cluster up`)"
        if not info["running"]
        else f"running: {info.get('nodes')} node(s), {info.get('cpus')} CPUs, "
        f"{info.get('gpus')} GPUs, Jobs API {info['dashboard_url']}"
    )
    _emit(info, as_json, human)
    if not info["running"]:
        raise typer.Exit(1)


@lake_app.command("up")
def lake_up(as_json: bool = JSON) -> None:
    """Start the embedded SeaweedFS S3 lake on 127.0.0.1 with generated credentials."""
    from medray.cluster.infra import s3server

    info = _run(s3server.up)
    public = {k: v for k, v in info.items() if k in ("endpoint", "bucket", "uri", "running")}
    _emit(
        public,
        as_json,
        f"S3 lake up at {info['endpoint']}: {info['uri']} (credentials in "
        f"{info['credentials_file']}, mode 0600)",
    )


@lake_app.command("down")
def lake_down() -> None:
    """Stop the embedded S3 lake (its data stays under MEDRAY_HOME)."""
    from medray.cluster.infra import s3server

    typer.echo("S3 lake stopped" if s3server.down() else "no embedded S3 lake was running")


@lake_app.command("status")
def lake_status(as_json: bool = JSON) -> None:
    """Whether the embedded S3 lake runs, and its endpoint."""
    from medray.cluster.infra import s3server

    info = s3server.status()
    public = {k: v for k, v in info.items() if k in ("endpoint", "bucket", "uri", "running")}
    _emit(
        public,
        as_json,
        f"running at {info['endpoint']}: {info['uri']}"
        if info["running"]
        else "the embedded S3 lake is not running (start it with `medray lake up`)",
    )
    if not info["running"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------- jobs
@app.command()
def stage(
    source: str = typer.Argument(
        ..., help="Folder tree, .npz, CSV/TSV manifest or DICOM folder; local or s3://."
    ),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset name."),
    fmt: str = typer.Option("auto", "--format", help="auto|folder|npz|csv|dicom"),
    image_size: int = typer.Option(None, help="Square size of the staged pixels [128]."),
    channels: int = typer.Option(None, help="1 (gray) or 3 (RGB) [1]."),
    shard_mb: float = typer.Option(None, help="Target shard size in MB [128]."),
    keep_original: bool = typer.Option(False, help="Also keep the (de-identified) original bytes."),
    val_percent: float = typer.Option(
        None, help="Validation share by patient when the source has no splits [10]."
    ),
    test_percent: float = typer.Option(None, help="Test share by patient [10]."),
    max_errors: str = typer.Option(
        None, help="Fail when more inputs fail: a count or a percent [10%]."
    ),
    label_names: str = typer.Option(None, help="Comma-separated class names for .npz labels."),
    path_column: str = typer.Option(None, help="CSV image path column [Image Index]."),
    label_column: str = typer.Option(None, help="CSV label column [Finding Labels]."),
    label_sep: str = typer.Option(None, help="CSV multi-label separator [|]."),
    no_finding: str = typer.Option(None, help="CSV value meaning no positive label [No Finding]."),
    patient_column: str = typer.Option(None, help="CSV patient column [Patient ID]."),
    images_root: str = typer.Option(
        None, help="Where CSV paths resolve (default: the CSV's folder)."
    ),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Stage images into a new dataset version (shards + manifest) in the lake."""
    values = {
        "source": source,
        "dataset": dataset,
        "format": fmt,
        "image_size": image_size,
        "channels": channels,
        "shard_mb": shard_mb,
        "keep_original": keep_original,
        "val_percent": val_percent,
        "test_percent": test_percent,
        "max_errors": max_errors,
        "label_names": label_names.split(",") if label_names else None,
        "path_column": path_column,
        "label_column": label_column,
        "label_sep": label_sep,
        "no_finding": no_finding,
        "patient_column": patient_column,
        "images_root": images_root,
        "lake": lake,
    }
    if "://" not in source and Path(source).exists():
        values["source"] = str(Path(source).resolve())
    if images_root and "://" not in images_root:
        values["images_root"] = str(Path(images_root).resolve())
    res = _submit("stage", _given(values), address, wait, as_json)
    _emit(
        res,
        as_json,
        None
        if not wait
        else f"staged {res.get('dataset')}:{res.get('version')}: {res.get('images')} images, "
        f"{res.get('duplicates', 0)} duplicates, {res.get('errors')} errors -> {res.get('uri')}",
    )


def _given(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@app.command()
def train(
    dataset: str = typer.Option(..., "--dataset", "-d", help="NAME or NAME:VERSION."),
    model: str = typer.Option(..., "--model", "-m", help="Model name to register."),
    arch: str = typer.Option(
        None, help="small_cnn|mobilenet_v2|efficientnet_b0|densenet121|inception_v3 [small_cnn]"
    ),
    epochs: int = typer.Option(None, help="Maximum epochs [12]."),
    batch_size: int = typer.Option(None, help="Global batch size [64]."),
    learning_rate: float = typer.Option(None, help="Adam learning rate [0.002]."),
    workers: int = typer.Option(None, help="Ray Train workers [1]."),
    cpus_per_worker: float = typer.Option(None, help="CPUs per worker [1]."),
    gpus_per_worker: float = typer.Option(None, help="GPUs per worker [0]."),
    weights: str = typer.Option(
        None, help="none|imagenet|PATH.keras|PATH.weights.h5|MODEL:VERSION [none]"
    ),
    mode: str = typer.Option(None, help="full|head [full]"),
    augment: bool = typer.Option(None, help="Random flips/crops/rotation/brightness."),
    class_weights: str = typer.Option(None, help="auto|none [auto]"),
    patience: int = typer.Option(None, help="Early-stopping patience in epochs [4]."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint of --run-id."),
    run_id: str = typer.Option(None, help="Training run id (for --resume)."),
    seed: int = typer.Option(None, help="Random seed [0]."),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Train on Ray Train (TensorFlow, MultiWorkerMirroredStrategy); registers a model version."""
    values = {
        "dataset": dataset,
        "model": model,
        "arch": arch,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "workers": workers,
        "cpus_per_worker": cpus_per_worker,
        "gpus_per_worker": gpus_per_worker,
        "weights": weights,
        "mode": mode,
        "augment": augment,
        "class_weights": class_weights,
        "patience": patience,
        "resume": resume,
        "run_id": run_id,
        "seed": seed,
        "lake": lake,
    }
    if weights and Path(weights).exists():
        values["weights"] = str(Path(weights).resolve())
    res = _submit("train", _given(values), address, wait, as_json)
    auc = (res.get("metrics") or {}).get("val_mean_auroc")
    _emit(
        res,
        as_json,
        None
        if not wait
        else f"registered {res.get('model')}:{res.get('version')} (validation mean AUROC "
        f"{auc if auc is None else round(auc, 4)}) -> {res.get('uri')}",
    )


@app.command()
def score(
    dataset: str = typer.Option(..., "--dataset", "-d", help="NAME or NAME:VERSION."),
    model: str = typer.Option(..., "--model", "-m", help="NAME, NAME:VERSION or NAME@ALIAS."),
    split: str = typer.Option(None, help="Only this split (train|val|test)."),
    run_id: str = typer.Option(None, help="Run id; the same id resumes an unfinished run."),
    actors: int = typer.Option(None, help="Scorer actors [1]."),
    batch_size: int = typer.Option(None, help="Rows per scorer batch [256]."),
    cpus_per_actor: float = typer.Option(None, help="CPUs per actor [1]."),
    gpus_per_actor: float = typer.Option(None, help="Whole GPUs per actor [0]."),
    allow_cpu: bool = typer.Option(False, help="Score on CPU when the cluster has no GPU."),
    only_new: bool = typer.Option(False, help="Skip images already scored by this model version."),
    retry_failed: str = typer.Option(None, help="Re-score the failed images of RUN_ID."),
    mixed_precision: bool = typer.Option(False, help="float16 compute on GPUs."),
    partition_by: str = typer.Option(None, help="none|date [none]"),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Score a dataset with a model version into a committed run of prediction tables."""
    values = {
        "dataset": dataset,
        "model": model,
        "split": split,
        "run_id": run_id,
        "actors": actors,
        "batch_size": batch_size,
        "cpus_per_actor": cpus_per_actor,
        "gpus_per_actor": gpus_per_actor,
        "allow_cpu": allow_cpu,
        "only_new": only_new,
        "retry_failed": retry_failed,
        "mixed_precision": mixed_precision,
        "partition_by": partition_by,
        "lake": lake,
    }
    res = _submit("score", _given(values), address, wait, as_json)
    _emit(
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
    run_id: str = typer.Argument(..., help="A committed run id."),
    reference: str = typer.Option(None, help="Reference run for drift (PSI, KS)."),
    compare: str = typer.Option(None, help="Another model's run on the same images."),
    heatmaps: int = typer.Option(None, help="Grad-CAM overlays for the K top images per label."),
    n_boot: int = typer.Option(None, help="Bootstrap resamples for CIs [1000]."),
    drift_psi: float = typer.Option(
        None, help="PSI above which a label is flagged as drifted (with KS p < 0.01) [0.2]."
    ),
    lake: str = LAKE,
    address: str = ADDRESS,
    wait: bool = WAIT,
    as_json: bool = JSON,
) -> None:
    """Metrics for a run: per-label AUROC and more, as Parquet tables and a terminal table."""
    values = {
        "run_id": run_id,
        "reference": reference,
        "compare": compare,
        "heatmaps": heatmaps,
        "n_boot": n_boot,
        "drift_psi": drift_psi,
        "lake": lake,
    }
    res = _submit("report", _given(values), address, wait, as_json)
    if as_json or not wait:
        _emit(res, as_json)
        return
    rows = [{"label": k, **v} for k, v in (res.get("metrics") or {}).items()]
    columns = [
        c
        for c in (
            "label",
            "images",
            "positives",
            "auroc",
            "auroc_lo",
            "auroc_hi",
            "f1",
            "positive_rate",
            "drifted",
        )
        if any(c in r for r in rows)
    ]
    typer.echo(_table(rows, columns))
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

    kind, values = _run(lambda: load_spec_file(spec_file, set_, lake))
    res = _submit(kind, values, address, wait, as_json)
    _emit(res, as_json)


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

    results = _run(lambda: sdk.predict([str(p) for p in images], model, lake))
    if as_json:
        _emit(results, True)
        return
    for path, scores in results.items():
        if len(results) > 1:
            typer.echo(f"{path}:")
        for label, value in scores[:top]:
            typer.echo(f"{label} (score = {value:.5f})")


# ---------------------------------------------------------------- management
@jobs_app.command("list")
def jobs_list(
    kind: str = typer.Option(None, help="Only this kind: stage, train, score or report."),
    status: str = typer.Option(None, help="Only this status, e.g. FAILED."),
    dataset: str = typer.Option(None, help="Only jobs on this dataset (NAME or NAME:VERSION)."),
    model: str = typer.Option(None, help="Only jobs of this model (NAME or NAME:VERSION)."),
    run_id: str = typer.Option(None, "--run-id", help="Only jobs of this run."),
    since: str = typer.Option(None, help="Only jobs started on or after this UTC date/time."),
    until: str = typer.Option(None, help="Only jobs started on or before this UTC date/time."),
    lake: str = LAKE,
    address: str = ADDRESS,
    as_json: bool = JSON,
) -> None:
    """Jobs from the lake's history, with the live cluster's status where it knows them."""
    from medray.jobs import sdk

    rows = _run(lambda: sdk.jobs_list(
        lake, address, kind=kind, status=status, dataset=dataset, model=model, run_id=run_id,
        since=since, until=until))
    _emit(rows, as_json, _table(
        rows, ["job_id", "kind", "status", "started_at", "dataset", "model", "run_id",
               "submitted_by"]))


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = ADDRESS) -> None:
    """The status of one job."""
    from medray.cluster.infra import jobs_client

    typer.echo(_run(lambda: jobs_client.status(job_id, address)))


@jobs_app.command("logs")
def jobs_logs(
    job_id: str, follow: bool = typer.Option(False, "--follow", "-f"), address: str = ADDRESS
) -> None:
    """The logs of one job."""
    from medray.cluster.infra import jobs_client

    if follow:
        _run(lambda: jobs_client.wait(job_id, address, on_log=lambda t: typer.echo(t, nl=False)))
    else:
        typer.echo(_run(lambda: jobs_client.logs(job_id, address)))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = ADDRESS) -> None:
    """Stop a running job (a stopped score run resumes with the same --run-id)."""
    from medray.cluster.infra import jobs_client

    typer.echo("stopping" if _run(lambda: jobs_client.stop(job_id, address)) else "not running")


@jobs_app.command("show")
def jobs_show(job_id: str, lake: str = LAKE, as_json: bool = JSON) -> None:
    """One job's record from the lake's history."""
    from medray.jobs import sdk

    _emit(_run(lambda: sdk.job_record(job_id, lake)), as_json)


@datasets_app.command("list")
def datasets_list(lake: str = LAKE, as_json: bool = JSON) -> None:
    """Committed dataset versions."""
    from medray.jobs import sdk

    rows = _run(lambda: sdk.datasets_list(lake))
    _emit(
        rows,
        as_json,
        _table(rows, ["dataset", "version", "images", "errors", "labels", "created_at"]),
    )


@datasets_app.command("show")
def datasets_show(
    ref: str = typer.Argument(..., help="NAME or NAME:VERSION"),
    lake: str = LAKE,
    as_json: bool = JSON,
) -> None:
    """A dataset version's manifest: counts by label and split."""
    from medray.jobs import sdk

    manifest = _run(lambda: sdk.dataset_show(ref, lake))
    if as_json:
        _emit(manifest, True)
        return
    typer.echo(
        f"{manifest['dataset']}:{manifest['version']}  {manifest['images']} images, "
        f"{manifest['duplicates']} duplicates, {manifest['errors']} errors, "
        f"{len(manifest['shards'])} shards, {manifest['image_size']}px "
        f"{manifest['channel_layout']}"
    )
    rows = [{"split": s, **c} for s, c in manifest["counts"].items()]
    labels = sorted({k for c in manifest["counts"].values() for k in c})
    typer.echo(_table(rows, ["split", *labels]))


@models_app.command("list")
def models_list(lake: str = LAKE, as_json: bool = JSON) -> None:
    """Registered model versions."""
    from medray.jobs import sdk

    rows = _run(lambda: sdk.models_list(lake))
    _emit(
        rows,
        as_json,
        _table(rows, ["model", "version", "arch", "labels", "dataset", "aliases", "created_at"]),
    )


@models_app.command("show")
def models_show(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME@ALIAS"), lake: str = LAKE
) -> None:
    """A model version's card."""
    from medray.jobs import sdk

    typer.echo(_run(lambda: sdk.model_show(ref, lake)))


@models_app.command("register")
def models_register(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A .keras file."),
    name: str = typer.Option(..., "--name"),
    labels: str = typer.Option(..., "--labels", help="Comma-separated, in output order."),
    multi_label: bool = typer.Option(False, help="Independent sigmoid scores per label."),
    lake: str = LAKE,
    as_json: bool = JSON,
) -> None:
    """Bring your own Keras model: register a .keras file as a new version."""
    from medray.jobs import sdk

    card = _run(
        lambda: sdk.models_register(str(path), name, labels.split(","), multi_label, lake)
    )
    _emit(card, as_json, f"registered {card['name']}:{card['version']}")


@models_app.command("promote")
def models_promote(
    ref: str = typer.Argument(..., help="NAME:VERSION"),
    alias: str = typer.Option("prod", "--alias"),
    lake: str = LAKE,
) -> None:
    """Point an alias (default prod) at a version: NAME@prod then resolves to it."""
    from medray.jobs import sdk

    aliases = _run(lambda: sdk.models_promote(ref, alias, lake))
    typer.echo(f"aliases: {aliases}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
