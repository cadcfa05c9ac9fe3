"""The SDK: the one module the CLI calls, usable from Python as well.

Job commands validate a spec, run the job's precheck against the lake (no Ray), submit the
spec as a Ray job, follow it and return its result. Lake commands (listings, registration, the
quick ``predict`` look, job history) run in the caller's own process.
"""

from __future__ import annotations

import getpass
import importlib
import json
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medray.cluster.infra import costs, env, jobs_client, wire
from medray.cluster.store import catalog, history, layout, registry
from medray.cluster.store.lake import Lake, default_lake_uri
from medray.workers.errors import ConfigError, InfraError, JobFailedError, NotFoundError
from medray.workers.models import ModelCard
from medray.workers.specs import (
    JobSpec,
    ReportSpec,
    ScoreSpec,
    StageSpec,
    TrainSpec,
    build_spec,
)


def resolve_lake(uri: str | None) -> Lake:
    return Lake(uri or default_lake_uri())


def precheck(spec: JobSpec, lake: Lake, address: str | None) -> None:
    """Catch what a job would refuse before anything is submitted (exit code 2): bad dataset,
    model and run references, a resume with other options, GPUs the cluster lacks, weights.
    Each job package has its own ``precheck`` module; none of them starts Ray."""
    module = importlib.import_module(f"medray.cluster.{spec.kind}.precheck")
    module.precheck(spec, lake, address)


def claim(spec: JobSpec, lake: Lake, address: str | None,
          job_id: str) -> Callable[[], object] | None:
    """What the job must own before it is submitted (a score run's lease), taken for
    ``job_id`` by the job package's ``precheck.claim`` when it has one; returns what lets go
    of it if the submission fails (exit 2 when a live job holds it)."""
    module = importlib.import_module(f"medray.cluster.{spec.kind}.precheck")
    take = getattr(module, "claim", None)
    return take(spec, lake, address, job_id) if take else None


def new_job_id(kind: str) -> str:
    return f"medray-{kind}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def submit(
    kind: str,
    values: dict[str, Any],
    address: str | None = None,
    wait: bool = True,
    on_log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    values = dict(values)
    lake = resolve_lake(values.get("lake") or None)
    values["lake"] = lake.uri
    spec = build_spec(kind, values)
    precheck(spec, lake, address)
    job_id = new_job_id(kind)
    extra = {
        env.SUBMITTED_AT: datetime.now(UTC).isoformat(),
        env.SUBMITTED_BY: getpass.getuser(),
    }
    prices = costs.load_prices()
    if prices:  # not secret: the job prices its own usage
        extra[env.PRICES_JSON] = json.dumps(prices)
    release = claim(spec, lake, address, job_id)
    # after the claim: only a run id the user named can meet another attempt, so an id made
    # here is taken by the job itself, as ever
    spec = with_ids(spec, lake)
    try:
        jobs_client.submit(spec, address, job_id=job_id, extra_env=extra)
    except BaseException:
        if release is not None:  # the job never existed: free what was claimed for it
            release()
        raise
    if not wait:
        return {"job_id": job_id, "status": "PENDING", **job_ids(spec)}
    status, logs = jobs_client.wait(job_id, address, on_log=on_log)
    history.attach_log_tail(lake, job_id, status, logs)
    if status != "SUCCEEDED":
        error = wire.error_from_logs(logs)
        message, code = error if error else (logs[-2000:], JobFailedError.exit_code)
        raise JobFailedError(f"{kind} job {job_id} {status.lower()}: {message}", exit_code=code)
    result = wire.result_from_logs(logs) or {}
    result.setdefault("job_id", job_id)
    return result


def with_ids(spec: JobSpec, lake: Lake) -> JobSpec:
    """``spec`` with the ids its job will use fixed here, before it is submitted: a score
    run's id and a training's id (unless ``--resume`` alone leaves the job to pick the
    latest). The job uses exactly these, so ``--no-wait`` can return them."""
    if isinstance(spec, ScoreSpec) and not spec.run_id:
        from medray.cluster.store import runs

        card = registry.resolve(lake, spec.model)
        assert card.version is not None  # a resolved card is a registered version
        return spec.model_copy(update={"run_id": runs.new_run_id(card.name, card.version)})
    if isinstance(spec, TrainSpec) and not spec.run_id and not spec.resume:
        from medray.cluster.train import checkpoints

        return spec.model_copy(update={"run_id": checkpoints.new_training_id(spec.model)})
    return spec


def job_ids(spec: JobSpec) -> dict[str, Any]:
    """The ids a submitted job will use, under the keys of its result: a stage's dataset (its
    version is claimed by the job: ``medray jobs show JOB`` names it once claimed), a
    training's model and training id, a score's or a report's run id."""
    if isinstance(spec, StageSpec):
        return {"dataset": spec.dataset}
    if isinstance(spec, TrainSpec):
        return {"model": spec.model, "training_id": spec.run_id}
    if isinstance(spec, ScoreSpec | ReportSpec):
        return {"run_id": spec.run_id}
    return {}


def report_copy(run_id: str, lake: str | None, output: str | Path | None = None) -> Path:
    """Copy a run's committed HTML report and its images from the lake (S3 or local) into
    ``output`` (default: ``MEDRAY_HOME/reports/<run_id>/``); the local ``report.html``."""
    from medray.cluster.report import local_copy

    return local_copy.export(resolve_lake(lake), run_id, report_dir(run_id, output))


def report_dir(run_id: str, output: str | Path | None = None) -> Path:
    """Where ``report_copy`` puts a run's report: ``output``, else MEDRAY_HOME/reports/RUN."""
    from medray.cluster.infra.home import medray_home

    dest = Path(output) if output else medray_home() / "reports" / run_id
    return dest.expanduser().resolve()


def stderr_log(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


# ---------------------------------------------------------------- in the caller's process
def datasets_list(lake: str | None) -> list[dict[str, Any]]:
    return catalog.list_datasets(resolve_lake(lake))


def dataset_show(ref: str, lake: str | None) -> dict[str, Any]:
    _, _, manifest = catalog.resolve(resolve_lake(lake), ref)
    return manifest


def dataset_delete(ref: str, lake: str | None, linkage: str | None = None,
                   force: bool = False) -> dict[str, Any]:
    """Delete a dataset version and the shards no other version lists (docs/deid.md)."""
    from medray.cluster.stage import purge

    return purge.delete_version(resolve_lake(lake), ref, linkage, force)


def dataset_errors(ref: str, lake: str | None, reveal: bool = False,
                   linkage: str | None = None) -> list[dict[str, Any]]:
    """A dataset version's errors rows; ``reveal``: DICOM pseudonyms as their source paths."""
    from medray.cluster.stage import purge

    return purge.errors(resolve_lake(lake), ref, reveal, linkage)


def dataset_reveal(ref: str, pseudonyms: list[str], lake: str | None,
                   linkage: str | None = None) -> dict[str, str | None]:
    """The source paths behind DICOM pseudonyms of a dataset version (private linkage)."""
    from medray.cluster.stage import purge

    return purge.reveal(resolve_lake(lake), ref, pseudonyms, linkage)


def run_files(run_id: str, lake: str | None) -> dict[str, list[str]]:
    """The full URIs of a committed run's prediction (``files``) and error (``error_files``)
    files, from its commit marker: what DuckDB, Spark or pandas should read. A glob of the
    run's folder would also read files of uncommitted or abandoned attempts."""
    from medray.cluster.store import runs

    return runs.committed_files(resolve_lake(lake), run_id)


def models_list(lake: str | None) -> list[dict[str, Any]]:
    return registry.list_models(resolve_lake(lake))


def model_show(ref: str, lake: str | None) -> str:
    return registry.resolve(resolve_lake(lake), ref).to_json()


def models_promote(ref: str, alias: str, lake: str | None) -> dict[str, int]:
    name, version, _ = registry.parse_ref(ref)
    if version is None:
        raise ConfigError("promote takes NAME:VERSION")
    return registry.promote(resolve_lake(lake), name, version, alias)


def models_register(
    path: str, name: str, labels: list[str], multi_label: bool, lake: str | None
) -> dict[str, Any]:
    from medray.workers.models import load_model

    model = load_model(path)
    shape = model.input_shape
    if not (isinstance(shape, tuple) and len(shape) == 4 and shape[1] == shape[2]):
        raise ConfigError(f"{path}: expected a square image input (None, S, S, C), got {shape}")
    if model.output_shape[-1] != len(labels):
        raise ConfigError(
            f"{path} gives {model.output_shape[-1]} scores but --labels names {len(labels)}"
        )
    card = ModelCard(
        name=name,
        labels=labels,
        multi_label=multi_label,
        input_size=int(shape[1]),
        channels=int(shape[3]),
        arch="external",
        source=f"registered from {Path(path).name}",
    )
    return registry.register(resolve_lake(lake), path, card).__dict__


def predict(
    paths: list[str], model_ref: str, lake: str | None
) -> dict[str, list[tuple[str, float]]]:
    import numpy as np

    from medray.workers import calibration
    from medray.workers.imaging import decode_image
    from medray.workers.models import configure_tensorflow, load_model

    lk = resolve_lake(lake)
    card = registry.resolve(lk, model_ref)
    configure_tensorflow()
    model = load_model(registry.fetch(lk, card))
    out: dict[str, list[tuple[str, float]]] = {}
    for path in paths:
        img = decode_image(
            Path(path).read_bytes(), size=card.input_size, channels=card.channels, name=path
        )
        raw = np.asarray(model(img.pixels[None].astype("float32"), training=False))
        # the card's calibration, as every scorer applies it: its thresholds are on this scale
        scores = calibration.apply_card(raw, card.calibration, card.labels, card.multi_label)[0]
        out[path] = sorted(
            zip(card.labels, (float(s) for s in scores), strict=True), key=lambda kv: -kv[1]
        )
    return out


def jobs_list(lake: str | None, address: str | None, **filters: Any) -> list[dict[str, Any]]:
    """History from the lake, overlaid with the live status of jobs the cluster still knows.

    Filters (``kind``, ``status``, ``dataset``, ``model``, ``run_id``, ``since``, ``until``)
    are those of :func:`medray.cluster.store.history.list_history`; a job the live cluster knows but
    the lake does not (its driver has not started yet) is listed only when no filter needs its
    record."""
    for key in ("since", "until"):
        if filters.get(key):
            filters[key] = _iso_date(key, str(filters[key]))
    status = filters.pop("status", None)
    rows = {
        d["job_id"]: {
            "job_id": d["job_id"],
            "kind": d["kind"],
            "status": d["status"],
            "started_at": d.get("started_at"),
            "ended_at": d.get("ended_at"),
            "dataset": _ref(d, "dataset"),
            "model": _ref(d, "model"),
            "run_id": d.get("run_id"),
            "submitted_by": d.get("submitted_by"),
        }
        for d in history.list_history(resolve_lake(lake), **filters)
    }
    try:
        live = jobs_client.list_jobs(address)
    except (ConfigError, InfraError):
        live = []
    record_only = any(filters.get(k) for k in ("dataset", "model", "run_id", "since", "until"))
    for job in live:
        if not job["job_id"] or not str(job["job_id"]).startswith("medray-"):
            continue
        if job["job_id"] in rows:
            rows[job["job_id"]]["status"] = job["status"]
        elif not record_only and (not filters.get("kind") or job["kind"] == filters["kind"]):
            rows[job["job_id"]] = {"job_id": job["job_id"], "kind": job["kind"],
                                   "status": job["status"]}
    out = [r for r in rows.values() if not status or r["status"] == status.upper()]
    return sorted(out, key=lambda r: (r.get("started_at") or "~", r["job_id"]))


def _ref(doc: dict[str, Any], key: str) -> str | None:
    name, version = doc.get(key), doc.get(f"{key}_version")
    if not name:
        return None
    return f"{name}:{version}" if version is not None else str(name)


def _iso_date(flag: str, value: str) -> str:
    """A --since/--until value as a sortable UTC ISO prefix; a clear error otherwise."""
    import datetime as dt

    try:
        if len(value) == 10:
            return dt.date.fromisoformat(value).isoformat()
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(
            f"--{flag} {value!r} is not a date: use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)"
        ) from None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.UTC).replace(tzinfo=None)
    return parsed.isoformat()


def job_record(job_id: str, lake: str | None) -> dict[str, Any]:
    doc = resolve_lake(lake).read_json_or_none(layout.job_record(job_id))
    if doc is None:
        raise NotFoundError(f"no job {job_id!r} in the lake's history")
    return dict(doc)


# ---------------------------------------------------------------- the local cluster and lake
# What `medray lake up|status` may show: the credentials file's path, never its content.
LAKE_PUBLIC = ("endpoint", "bucket", "uri", "running", "credentials_file")


def cluster_up(nodes: int = 1, num_cpus: int | None = None,
               num_gpus: int | None = None) -> dict[str, Any]:
    """Start the local Ray cluster (head on 127.0.0.1, Jobs API with token auth)."""
    from medray.cluster.infra import ray_local

    return ray_local.up(nodes=nodes, num_cpus=num_cpus, num_gpus=num_gpus)


def cluster_up_autoscaling(config: Path) -> dict[str, Any]:
    """Start a local cluster whose worker nodes Ray's autoscaler adds and removes."""
    from medray.cluster.infra import autoscale

    return autoscale.up(config)


def cloud_up(config: Path) -> int:
    """`ray up` a cloud cluster from a Ray cluster launcher YAML; its exit status."""
    import subprocess

    # the venv's own `ray`, whatever PATH holds
    ray_cli = str(Path(sys.executable).parent / "ray")
    return subprocess.call([ray_cli, "up", "-y", str(config)])  # noqa: S603 - our own binary


def cluster_down() -> bool:
    from medray.cluster.infra import ray_local

    return ray_local.down()


def cluster_status() -> dict[str, Any]:
    from medray.cluster.infra import ray_local

    return ray_local.status()


def lake_up() -> dict[str, Any]:
    """Start the embedded S3 lake; what may be shown of it."""
    from medray.cluster.infra import s3server

    return {k: v for k, v in s3server.up().items() if k in LAKE_PUBLIC}


def lake_down() -> bool:
    from medray.cluster.infra import s3server

    return s3server.down()


def lake_status() -> dict[str, Any]:
    from medray.cluster.infra import s3server

    return {k: v for k, v in s3server.status().items() if k in LAKE_PUBLIC}


# ---------------------------------------------------------------- one job on the cluster
def job_status(job_id: str, address: str | None) -> str:
    return jobs_client.status(job_id, address)


def job_logs(job_id: str, address: str | None,
             on_log: Callable[[str], None] | None = None) -> str:
    """The job's log; with ``on_log``, follow it until the job ends."""
    if on_log is None:
        return jobs_client.logs(job_id, address)
    return jobs_client.wait(job_id, address, on_log=on_log)[1]


def job_stop(job_id: str, address: str | None) -> bool:
    return jobs_client.stop(job_id, address)


def doctor(lake: str | None, address: str | None) -> dict[str, Any]:
    """``medray doctor``: lake, credentials, cluster, GPUs and spill disk, one check each;
    ``ok`` is False when any check found a problem (each names its fix)."""
    from medray.cluster.infra import doctor as checks

    return checks.run_all(lake, address)
