"""The management command groups of ``medray``: the local services (``cluster``, ``lake``) and
what the lake and cluster hold (``jobs``, ``datasets``, ``models``).

Each command parses, makes one call and prints; the call's module is imported inside the
command so that ``medray --help`` loads none of them.
"""

from __future__ import annotations

from pathlib import Path

import typer

from medray.jobs.flags import ADDRESS, JSON, LAKE
from medray.jobs.output import call, emit, table

cluster_app = typer.Typer(
    help="The local Ray cluster (head + Jobs API on 127.0.0.1).", no_args_is_help=True
)
lake_app = typer.Typer(help="The embedded S3 lake (SeaweedFS on 127.0.0.1).", no_args_is_help=True)
jobs_app = typer.Typer(
    help="Jobs on the cluster and their history in the lake.", no_args_is_help=True
)
datasets_app = typer.Typer(help="Dataset versions in the lake.", no_args_is_help=True)
models_app = typer.Typer(help="Model versions and aliases in the lake.", no_args_is_help=True)

# in the order `medray --help` lists them
GROUPS: dict[str, typer.Typer] = {
    "cluster": cluster_app,
    "lake": lake_app,
    "jobs": jobs_app,
    "datasets": datasets_app,
    "models": models_app,
}

# what `lake up` and `lake status` show of the server's state: never its credentials
# ---------------------------------------------------------------- cluster
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
    autoscale: Path = typer.Option(
        None,
        "--autoscale",
        help="A local autoscaling config (configs/cluster/autoscale-local.yaml): Ray's "
        "autoscaler adds worker nodes on this machine when jobs ask for them.",
    ),
    as_json: bool = JSON,
) -> None:
    """Start the local Ray cluster (or a cloud one with --config)."""
    from medray.jobs import sdk

    if config is not None:
        raise typer.Exit(sdk.cloud_up(config))  # `ray up`'s exit status is the command's
    if autoscale is not None:
        info = call(lambda: sdk.cluster_up_autoscaling(autoscale))
    else:
        info = call(lambda: sdk.cluster_up(nodes=nodes, num_cpus=num_cpus, num_gpus=num_gpus))
    emit(
        info,
        as_json,
        f"Ray cluster up: {info.get('nodes')} node(s), {info.get('cpus')} CPUs, "
        f"{info.get('gpus')} GPUs; Jobs API at {info['dashboard_url']} (token auth on)",
    )


@cluster_app.command("down")
def cluster_down() -> None:
    """Stop the local Ray cluster started by `medray cluster up`."""
    from medray.jobs import sdk

    typer.echo("Ray cluster stopped" if sdk.cluster_down() else "no local Ray cluster was running")


@cluster_app.command("status")
def cluster_status(as_json: bool = JSON) -> None:
    """Nodes, CPUs and GPUs of the local cluster."""
    from medray.jobs import sdk

    info = sdk.cluster_status()
    human = (
        "no local Ray cluster (start one with `medray cluster up`)"
        if not info["running"]
        else f"running: {info.get('nodes')} node(s), {info.get('cpus')} CPUs, "
        f"{info.get('gpus')} GPUs, Jobs API {info['dashboard_url']}"
    )
    emit(info, as_json, human)
    if not info["running"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------- lake
@lake_app.command("up")
def lake_up(as_json: bool = JSON) -> None:
    """Start the embedded SeaweedFS S3 lake on 127.0.0.1 with generated credentials."""
    from medray.jobs import sdk

    info = call(sdk.lake_up)
    emit(
        {k: v for k, v in info.items() if k != "credentials_file"},
        as_json,
        f"S3 lake up at {info['endpoint']}: {info['uri']} (credentials in "
        f"{info['credentials_file']}, mode 0600)",
    )


@lake_app.command("down")
def lake_down() -> None:
    """Stop the embedded S3 lake (its data stays under MEDRAY_HOME)."""
    from medray.jobs import sdk

    typer.echo("S3 lake stopped" if sdk.lake_down() else "no embedded S3 lake was running")


@lake_app.command("status")
def lake_status(as_json: bool = JSON) -> None:
    """Whether the embedded S3 lake runs, and its endpoint."""
    from medray.jobs import sdk

    info = sdk.lake_status()
    emit(
        {k: v for k, v in info.items() if k != "credentials_file"},
        as_json,
        f"running at {info['endpoint']}: {info['uri']}"
        if info["running"]
        else "the embedded S3 lake is not running (start it with `medray lake up`)",
    )
    if not info["running"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------- jobs
@jobs_app.command("list")
def jobs_list(
    kind: str = typer.Option(None, help="Only this kind: stage, train, score, report or publish."),
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

    rows = call(
        lambda: sdk.jobs_list(
            lake,
            address,
            kind=kind,
            status=status,
            dataset=dataset,
            model=model,
            run_id=run_id,
            since=since,
            until=until,
        )
    )
    columns = ["job_id", "kind", "status", "started_at", "dataset", "model", "run_id"]
    emit(rows, as_json, table(rows, [*columns, "submitted_by"]))


@jobs_app.command("status")
def jobs_status(job_id: str, address: str = ADDRESS) -> None:
    """The status of one job."""
    from medray.jobs import sdk

    typer.echo(call(lambda: sdk.job_status(job_id, address)))


@jobs_app.command("logs")
def jobs_logs(
    job_id: str, follow: bool = typer.Option(False, "--follow", "-f"), address: str = ADDRESS
) -> None:
    """The logs of one job."""
    from medray.jobs import sdk

    if follow:
        call(lambda: sdk.job_logs(job_id, address, on_log=lambda t: typer.echo(t, nl=False)))
    else:
        typer.echo(call(lambda: sdk.job_logs(job_id, address)))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: str = ADDRESS) -> None:
    """Stop a running job (a stopped score run resumes with the same --run-id)."""
    from medray.jobs import sdk

    typer.echo("stopping" if call(lambda: sdk.job_stop(job_id, address)) else "not running")


@jobs_app.command("show")
def jobs_show(job_id: str, lake: str = LAKE, as_json: bool = JSON) -> None:
    """One job's record from the lake's history."""
    from medray.jobs import sdk

    emit(call(lambda: sdk.job_record(job_id, lake)), as_json)


# ---------------------------------------------------------------- datasets
@datasets_app.command("list")
def datasets_list(lake: str = LAKE, as_json: bool = JSON) -> None:
    """Committed dataset versions."""
    from medray.jobs import sdk

    rows = call(lambda: sdk.datasets_list(lake))
    emit(
        rows,
        as_json,
        table(rows, ["dataset", "version", "images", "errors", "labels", "created_at"]),
    )


@datasets_app.command("show")
def datasets_show(
    ref: str = typer.Argument(..., help="NAME or NAME:VERSION"),
    lake: str = LAKE,
    as_json: bool = JSON,
) -> None:
    """A dataset version's manifest: counts by label and split."""
    from medray.jobs import sdk

    manifest = call(lambda: sdk.dataset_show(ref, lake))
    if as_json:
        emit(manifest, True)
        return
    typer.echo(
        f"{manifest['dataset']}:{manifest['version']}  {manifest['images']} images, "
        f"{manifest['duplicates']} duplicates, {manifest['errors']} errors, "
        f"{len(manifest['shards'])} shards, {manifest['image_size']}px "
        f"{manifest['channel_layout']}"
    )
    rows = [{"split": s, **c} for s, c in manifest["counts"].items()]
    labels = sorted({k for c in manifest["counts"].values() for k in c})
    typer.echo(table(rows, ["split", *labels]))


_LINKAGE = typer.Option(None, "--linkage", help="Where the stage job wrote the DICOM path "
                       "linkage (default: MEDRAY_HOME on this machine).")


@datasets_app.command("delete")
def datasets_delete(
    ref: str = typer.Argument(..., help="NAME:VERSION"),
    force: bool = typer.Option(False, "--force", help="Even while a staging of NAME runs."),
    linkage: str = _LINKAGE,
    lake: str = LAKE,
    as_json: bool = JSON,
) -> None:
    """Delete a dataset version: its manifest, the shards no other version lists, its linkage."""
    from medray.jobs import sdk

    res = call(lambda: sdk.dataset_delete(ref, lake, linkage, force))
    emit(res, as_json, f"deleted {res['dataset']}:{res['version']}: {res['removed_files']} "
                       f"files removed, {len(res['kept_files'])} kept (listed by other versions)")


@datasets_app.command("errors")
def datasets_errors(
    ref: str = typer.Argument(..., help="NAME or NAME:VERSION"),
    reveal: bool = typer.Option(False, "--reveal", help="Show DICOM source paths (from the "
                                "private linkage) instead of their pseudonyms."),
    linkage: str = _LINKAGE,
    lake: str = LAKE,
    as_json: bool = JSON,
) -> None:
    """The inputs of a dataset version that could not be staged, and why."""
    from medray.jobs import sdk

    rows = call(lambda: sdk.dataset_errors(ref, lake, reveal, linkage))
    emit(rows, as_json, table(rows, ["source_uri", "error_type", "stage", "message"]))


@datasets_app.command("reveal")
def datasets_reveal(
    ref: str = typer.Argument(..., help="NAME or NAME:VERSION"),
    pseudonyms: list[str] = typer.Argument(..., help="dicom:... values of source_uri"),
    linkage: str = _LINKAGE,
    lake: str = LAKE,
    as_json: bool = JSON,
) -> None:
    """The source paths behind DICOM pseudonyms (a prediction's or an errors row's)."""
    from medray.jobs import sdk

    found = call(lambda: sdk.dataset_reveal(ref, pseudonyms, lake, linkage))
    emit(found, as_json, "\n".join(f"{k}\t{v or '(not in this version)'}"
                                   for k, v in found.items()))


# ---------------------------------------------------------------- models
@models_app.command("list")
def models_list(lake: str = LAKE, as_json: bool = JSON) -> None:
    """Registered model versions."""
    from medray.jobs import sdk

    rows = call(lambda: sdk.models_list(lake))
    emit(
        rows,
        as_json,
        table(rows, ["model", "version", "arch", "labels", "dataset", "aliases", "created_at"]),
    )


@models_app.command("show")
def models_show(
    ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME@ALIAS"),
    lake: str = LAKE,
    text: bool = typer.Option(
        False, "--text", help="Render the card as text sections (Mitchell et al.), not JSON."
    ),
) -> None:
    """A model version's card: use, data, metrics, calibration, thresholds (JSON)."""
    import json

    from medray.jobs import sdk
    from medray.workers.model_card import render_text

    card = call(lambda: sdk.model_show(ref, lake))
    typer.echo(render_text(json.loads(card)) if text else card)


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

    card = call(lambda: sdk.models_register(str(path), name, labels.split(","), multi_label, lake))
    emit(card, as_json, f"registered {card['name']}:{card['version']}")


@models_app.command("promote")
def models_promote(
    ref: str = typer.Argument(..., help="NAME:VERSION"),
    alias: str = typer.Option("prod", "--alias"),
    lake: str = LAKE,
) -> None:
    """Point an alias (default prod) at a version: NAME@prod then resolves to it."""
    from medray.jobs import sdk

    aliases = call(lambda: sdk.models_promote(ref, alias, lake))
    typer.echo(f"aliases: {aliases}")


# ---------------------------------------------------------------- doctor
def doctor(lake: str = LAKE, address: str = ADDRESS, as_json: bool = JSON) -> None:
    """Check the lake, credentials, cluster, GPUs and spill disk; name each fix.

    One line per check: ok, or PROBLEM with the command that fixes it. Exit code 0 when every
    check passes, 1 when any fails.
    """
    from medray.cluster.infra.doctor import Check
    from medray.jobs import sdk

    report = sdk.doctor(lake, address)
    human = "\n".join(Check(**c).line() for c in report["checks"])
    emit(report, as_json, human)
    raise typer.Exit(0 if report["ok"] else 1)


# commands of their own (no group), registered on the app by the CLI module
COMMANDS = {"doctor": doctor}
