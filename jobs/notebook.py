"""The notebook SDK behind ``import medray``: a connection to a lake and a cluster, functions
that mirror the CLI's commands, and objects for what they make (a dataset version, a model
version, a scoring run, a report, a job) whose methods return pandas DataFrames.

Every job goes through ``medray.jobs.sdk.submit``, the same call the CLI makes: the options are
validated into the job's spec there (unknown names refused with "did you mean"), prechecked
and submitted; defaults live only on the spec fields, so an option left as ``None`` here is
one the job takes from the spec (or the environment). Readers see committed data only: a run,
a dataset version or a report is read through its commit marker, never a folder listing, and
one that is not committed raises :class:`NotFoundError` with what to do.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from medray.cluster.store import catalog, layout, registry, runs
from medray.cluster.store.lake import Lake
from medray.jobs import sdk
from medray.jobs.notebook_progress import NotebookProgress
from medray.workers.errors import ConfigError, JobFailedError, MedrayError, NotFoundError
from medray.workers.specs import SPECS, JobSpec

if TYPE_CHECKING:
    import pandas as pd

# spec fields that hold local paths: made absolute here, since the job runs elsewhere
_LOCAL_PATHS = ("source", "images_root", "linkage", "weights", "card_file")
# what ``Dataset.table`` leaves out unless asked: the image bytes
_BINARY = ("pixels", "original")

F = TypeVar("F", bound=Callable[..., Any])


def _options_doc(kind: str) -> Callable[[F], F]:
    """Append the job's options, with their spec descriptions and defaults, to a docstring,
    so the notebook help and ``medray KIND --help`` are written once, on the spec."""
    spec: type[JobSpec] = SPECS[kind]

    def decorate(fn: F) -> F:
        # indented as the method docstrings they extend, so inspect.getdoc aligns them
        lines = [f"\n        Options (those of ``medray {kind}``; None: the spec's default):\n"]
        for name, info in spec.model_fields.items():
            if name in ("kind", "lake"):
                continue
            default = "required" if info.is_required() else f"default {info.default!r}"
            lines.append(f"            {name}: {info.description} ({default})")
        fn.__doc__ = (fn.__doc__ or "") + "\n".join(lines) + "\n"
        return fn

    return decorate


def _frame(rows: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(rows, columns=list(columns)) if not rows else pd.DataFrame(rows)


def connect(lake: str | None = None, address: str | None = None,
            progress: bool = True) -> Connection:
    """A connection to a lake and a Ray cluster, as the CLI's ``--lake`` and ``--address``.

    ``lake``: a local path, ``file://...`` or ``s3://bucket/prefix``; default ``MEDRAY_LAKE``,
    else the embedded S3 lake when ``medray lake up`` runs, else a folder in ``MEDRAY_HOME``.
    ``address``: the Ray Jobs API; default ``RAY_ADDRESS``, else the local cluster that
    ``medray cluster up`` started. ``progress``: show progress bars while a job runs.
    """
    return Connection(sdk.resolve_lake(lake).uri, address, progress)


@dataclass(frozen=True)
class Connection:
    """What ``medray.connect`` returns: the lake (its URI) and the cluster the jobs go to."""

    lake: str
    address: str | None = None
    progress: bool = True

    def __repr__(self) -> str:
        return f"medray.connect(lake={self.lake!r}, address={self.address!r})"

    # ------------------------------------------------------------------------------ jobs
    @_options_doc("stage")
    def stage(self, source: str | Path, dataset: str, *, label_names: list[str] | None = None,
              image_size: int | None = None, channels: Literal[1, 3] | None = None,
              val_percent: float | None = None, test_percent: float | None = None,
              max_errors: str | None = None, wait: bool = True,
              **options: Any) -> Dataset | Job:
        """Stage images into a new version of ``dataset`` (``medray stage SOURCE --dataset``).

        ``source``: a folder, a MedMNIST-style ``.npz``, a CSV or DICOM files (local or
        ``s3://``). Waits for the job and returns the committed :class:`Dataset`; with
        ``wait=False`` returns the :class:`Job` at once.
        """
        values = {"source": str(source), "dataset": dataset, "label_names": label_names,
                  "image_size": image_size, "channels": channels, "val_percent": val_percent,
                  "test_percent": test_percent, "max_errors": max_errors, **options}
        result = self._submit("stage", values, wait)
        if not wait:
            return self._job("stage", result)
        return Dataset(self, str(result["dataset"]), int(result["version"]), result)

    @_options_doc("train")
    def train(self, dataset: Dataset | str, model: str, *, arch: str | None = None,
              epochs: int | None = None, batch_size: int | None = None,
              learning_rate: float | None = None, workers: int | None = None,
              weights: str | None = None, seed: int | None = None, wait: bool = True,
              **options: Any) -> Model | Job:
        """Train ``model`` on ``dataset`` with Ray Train and register a new model version
        (``medray train --dataset --model``).

        ``dataset``: a :class:`Dataset`, ``NAME`` (its latest version) or ``NAME:VERSION``.
        Waits and returns the registered :class:`Model`; ``wait=False`` returns the
        :class:`Job`.
        """
        self._check_dataset(str(dataset))
        values = {"dataset": str(dataset), "model": model, "arch": arch, "epochs": epochs,
                  "batch_size": batch_size, "learning_rate": learning_rate, "workers": workers,
                  "weights": weights, "seed": seed, **options}
        result = self._submit("train", values, wait)
        if not wait:
            return self._job("train", result)
        return Model(self, str(result["model"]), int(result["version"]), result)

    @_options_doc("score")
    def score(self, dataset: Dataset | str, model: Model | str, *, split: str | None = None,
              run_id: str | None = None, actors: int | None = None,
              batch_size: int | None = None, allow_cpu: bool | None = None,
              only_new: bool | None = None, wait: bool = True,
              **options: Any) -> Run | Job:
        """Score ``dataset`` with ``model`` into a committed run (``medray score``).

        ``model``: a :class:`Model`, ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS``; ``run_id``
        resumes a stopped or failed run. Waits and returns the committed :class:`Run`;
        ``wait=False`` returns the :class:`Job`.
        """
        self._check_dataset(str(dataset))
        self._check_model(str(model))
        values = {"dataset": str(dataset), "model": str(model), "split": split,
                  "run_id": run_id, "actors": actors, "batch_size": batch_size,
                  "allow_cpu": allow_cpu, "only_new": only_new, **options}
        result = self._submit("score", values, wait)
        if not wait:
            return self._job("score", result)
        return Run(self, str(result["run_id"]), result)

    @_options_doc("report")
    def report(self, run: Run | str, *, reference: Run | str | None = None,
               compare: Run | str | None = None, heatmaps: int | None = None,
               n_boot: int | None = None, subgroups: str | None = None, wait: bool = True,
               **options: Any) -> Report | Job:
        """Metrics, calibration and drift for a committed run, as tables and an HTML page
        (``medray report RUN``). Waits and returns the :class:`Report` (shown inline in
        Jupyter); ``wait=False`` returns the :class:`Job`.
        """
        values = {"run_id": str(run), "reference": _str(reference), "compare": _str(compare),
                  "heatmaps": heatmaps, "n_boot": n_boot, "subgroups": subgroups, **options}
        result = self._submit("report", values, wait)
        if not wait:
            return self._job("report", result)
        return Report(self, str(result["run_id"]), result)

    # ------------------------------------------------------------------------------ here
    def predict(self, images: str | Path | Sequence[str | Path],
                model: Model | str) -> pd.DataFrame:
        """A quick local look (``medray predict``): one row per image, one score column per
        label and the top label, computed in this process (no cluster)."""
        import pandas as pd

        paths = [str(images)] if isinstance(images, str | Path) else [str(p) for p in images]
        self._check_model(str(model))
        found = sdk.predict(paths, str(model), self.lake)
        rows = [{"image": path, "top_label": scores[0][0],
                 **{f"score_{label}": value for label, value in scores}}
                for path, scores in found.items()]
        return pd.DataFrame(rows)

    def datasets(self) -> pd.DataFrame:
        """Committed dataset versions (``medray datasets list``)."""
        return _frame(sdk.datasets_list(self.lake),
                      ["dataset", "version", "images", "errors", "labels", "created_at"])

    def models(self) -> pd.DataFrame:
        """Registered model versions (``medray models list``)."""
        return _frame(sdk.models_list(self.lake),
                      ["model", "version", "arch", "labels", "dataset", "aliases", "metrics",
                       "created_at"])

    def jobs(self, **filters: Any) -> pd.DataFrame:
        """Jobs from the lake's history with the cluster's live status (``medray jobs list``);
        filters: kind, status, dataset, model, run_id, since, until."""
        return _frame(sdk.jobs_list(self.lake, self.address, **filters),
                      ["job_id", "kind", "status", "started_at", "ended_at", "dataset", "model",
                       "run_id", "submitted_by"])

    def dataset(self, ref: str) -> Dataset:
        """A committed dataset version: ``NAME`` (the latest) or ``NAME:VERSION``."""
        self._check_dataset(ref)
        name, version, manifest = catalog.resolve(self._lake(), ref)
        return Dataset(self, name, version, manifest)

    def model(self, ref: str) -> Model:
        """A registered model version: ``NAME``, ``NAME:VERSION`` or ``NAME@ALIAS``."""
        self._check_model(ref)
        card = registry.resolve(self._lake(), ref)
        assert card.version is not None  # resolved cards are registered
        return Model(self, card.name, card.version, {})

    def run(self, run_id: str) -> Run:
        """A scoring run by id (its data can be read once it is committed)."""
        return Run(self, run_id, {})

    # ------------------------------------------------------------------------------ inside
    def _lake(self) -> Lake:
        return Lake(self.lake)

    def _submit(self, kind: str, values: dict[str, Any], wait: bool) -> dict[str, Any]:
        given = {k: v for k, v in values.items() if v is not None}
        for key in _LOCAL_PATHS:
            value = given.get(key)
            if isinstance(value, str) and "://" not in value and Path(value).exists():
                given[key] = str(Path(value).resolve())
        given["lake"] = self.lake
        if not wait or not self.progress:
            return sdk.submit(kind, given, address=self.address, wait=wait)
        bars = NotebookProgress(kind)
        try:
            result = sdk.submit(kind, given, address=self.address, wait=True, on_log=bars)
        except JobFailedError:
            bars.close("FAILED")
            raise
        except MedrayError:  # refused before it ran, or the cluster failed us: the error says
            bars.close("ERROR")
            raise
        except BaseException:  # stopped waiting (an interrupt), not the job: say where it is
            bars.close("NO LONGER FOLLOWED (a job runs on: see mr.jobs(status='RUNNING'))")
            raise
        bars.close("SUCCEEDED")
        return result

    def _job(self, kind: str, result: dict[str, Any]) -> Job:
        return Job(self, str(result["job_id"]), kind, dict(result))

    def _check_dataset(self, ref: str) -> None:
        """A dataset name this lake does not have, named with the ones it has and the fix."""
        name = ref.partition(":")[0]
        lake = self._lake()
        if catalog.committed_versions(lake, name):
            return
        have = sorted(n for n in lake.list_dirs(layout.DATASETS)
                      if catalog.committed_versions(lake, n))
        raise NotFoundError(
            f"no dataset {name!r} in {self.lake} (it has: {', '.join(have) or 'none'}); "
            f"stage it first: mr.stage(SOURCE, dataset={name!r})")

    def _check_model(self, ref: str) -> None:
        name = registry.parse_ref(ref)[0]
        lake = self._lake()
        if registry.versions(lake, name):
            return
        have = sorted(n for n in lake.list_dirs(layout.MODELS) if registry.versions(lake, n))
        raise NotFoundError(
            f"no model {name!r} in {self.lake} (it has: {', '.join(have) or 'none'}); "
            f"train one first: mr.train(dataset=..., model={name!r})")


def _str(value: object | None) -> str | None:
    return None if value is None else str(value)


# ---------------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class Dataset:
    """A committed dataset version; ``str(dataset)`` is ``NAME:VERSION``, what jobs take."""

    conn: Connection = field(repr=False)
    name: str
    version: int
    result: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"

    def manifest(self) -> dict[str, Any]:
        """The version's manifest: counts by split and label, shards, image size."""
        return catalog.manifest(self.conn._lake(), self.name, self.version)

    def table(self, columns: Sequence[str] | None = None,
              split: str | None = None) -> pd.DataFrame:
        """The version's images as a DataFrame, one row per image, from the shards its
        manifest lists. ``columns`` default to every column but the image bytes (``pixels``,
        ``original``); ``split`` keeps one split (train, val or test)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        lake = self.conn._lake()
        paths = [s["path"] for s in self.manifest()["shards"]]
        if not paths:
            raise NotFoundError(f"dataset {self} lists no shards: it holds no images")
        tables = []
        for rel in paths:
            have = pq.read_schema(lake.path(rel), filesystem=lake.fs).names
            keep = list(columns) if columns is not None else \
                [c for c in have if c not in _BINARY]
            unknown = [c for c in keep if c not in have]
            if unknown:
                raise ConfigError(f"dataset {self} has no column(s) {unknown}: it has {have}")
            read = list(dict.fromkeys([*keep, "split"])) if split is not None else keep
            tables.append(lake.read_parquet(rel, columns=read))
        data = pa.concat_tables(tables, promote_options="default")
        if split is not None:
            data = data.filter(pc.equal(data.column("split"), split))
        return data.select(keep).to_pandas()

    def errors(self) -> pd.DataFrame:
        """The inputs that could not be staged, and why (``medray datasets errors``)."""
        return _frame(sdk.dataset_errors(str(self), self.conn.lake),
                      ["source_uri", "error_type", "stage", "message"])


@dataclass(frozen=True)
class Model:
    """A registered model version; ``str(model)`` is ``NAME:VERSION``."""

    conn: Connection = field(repr=False)
    name: str
    version: int
    result: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"

    def card(self) -> dict[str, Any]:
        """The model card: labels, input size, metrics, calibration, thresholds."""
        return registry.resolve(self.conn._lake(), str(self)).to_dict()

    def predict(self, images: str | Path | Sequence[str | Path]) -> pd.DataFrame:
        """``Connection.predict`` with this model."""
        return self.conn.predict(images, self)


@dataclass(frozen=True)
class Run:
    """A scoring run; its data can be read once its commit marker exists."""

    conn: Connection = field(repr=False)
    run_id: str
    result: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return self.run_id

    def committed(self) -> bool:
        return runs.is_committed(self.conn._lake(), self.run_id)

    def _require_commit(self) -> Lake:
        lake = self.conn._lake()
        if not runs.is_committed(lake, self.run_id):
            raise NotFoundError(
                f"run {self.run_id!r} is not committed in {self.conn.lake}: it is still "
                f"running, failed or never existed; see mr.jobs(run_id={self.run_id!r}), and "
                f"resume it with mr.score(dataset=..., model=..., run_id={self.run_id!r})")
        return lake

    def predictions(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Every prediction row of the committed run: image id, true and predicted labels, a
        ``score_<label>`` column per label, model and run ids."""
        lake = self._require_commit()
        cols = list(columns) if columns is not None else None
        return runs.read_predictions(lake, self.run_id, cols).to_pandas()

    def errors(self) -> pd.DataFrame:
        """The images of the committed run that could not be scored, and why."""
        return runs.read_errors(self._require_commit(), self.run_id).to_pandas()

    def files(self) -> dict[str, list[str]]:
        """The URIs of the run's prediction and error files, for DuckDB, Spark or pandas."""
        self._require_commit()
        return sdk.run_files(self.run_id, self.conn.lake)

    def report(self) -> Report:
        """The run's committed report (make one with ``mr.report(run)``)."""
        report = Report(self.conn, self.run_id, {})
        report._require_commit()
        return report

    def metrics(self) -> pd.DataFrame:
        """Per-label metrics of the run's committed report (AUROC, F1, ECE with CIs)."""
        return self.report().metrics()


@dataclass(frozen=True)
class Report:
    """A run's committed report; shown inline in Jupyter (``_repr_html_``)."""

    conn: Connection = field(repr=False)
    run_id: str
    result: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def _require_commit(self) -> Lake:
        self.conn.run(self.run_id)._require_commit()
        lake = self.conn._lake()
        if not lake.exists(layout.run_report_commit(self.run_id)):
            raise NotFoundError(f"run {self.run_id!r} has no committed report: make one with "
                                f"mr.report({self.run_id!r})")
        return lake

    @property
    def html(self) -> str:
        """The report page (self-contained: its plots are inline images)."""
        lake = self._require_commit()
        return lake.read_bytes(layout.run_report_html(self.run_id)).decode()

    def _repr_html_(self) -> str:
        # in an iframe: the page's own styles must not restyle the notebook around it
        return (f'<iframe title="medray report {html.escape(self.run_id)}" '
                f'srcdoc="{html.escape(self.html, quote=True)}" '
                'style="width:100%;height:720px;border:1px solid #ddd"></iframe>')

    def save(self, path: str | Path) -> Path:
        """Write the page to a local file (open it in a browser); its path."""
        out = Path(path).expanduser().resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(self.html, encoding="utf-8")
        return out

    def table(self, name: str) -> pd.DataFrame:
        """One report table: summary, per_label_metrics, thresholds, calibration,
        operating_points, subgroups, subgroup_gaps, drift, compare or heatmaps."""
        lake = self._require_commit()
        rel = layout.run_report_table(self.run_id, name)
        if not lake.exists(rel):
            raise NotFoundError(f"the report of {self.run_id!r} has no {name!r} table")
        return lake.read_parquet(rel).to_pandas()

    def metrics(self) -> pd.DataFrame:
        """Per-label metrics: AUROC, F1, ECE and their bootstrap intervals."""
        return self.table("per_label_metrics")

    def calibration(self) -> pd.DataFrame:
        return self.table("calibration")


@dataclass(frozen=True)
class Job:
    """A submitted job (``wait=False``): its id and the ids it announced."""

    conn: Connection = field(repr=False)
    job_id: str
    kind: str
    ids: dict[str, Any] = field(default_factory=dict, compare=False)

    def __str__(self) -> str:
        return self.job_id

    def status(self) -> str:
        """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (``medray jobs status``)."""
        return sdk.job_status(self.job_id, self.conn.address)

    def logs(self) -> str:
        """The job's whole log (``medray jobs logs``)."""
        return sdk.job_logs(self.job_id, self.conn.address)

    def stop(self) -> bool:
        """Stop the job; a stopped score run resumes with the same ``run_id``."""
        return sdk.job_stop(self.job_id, self.conn.address)

    @property
    def run(self) -> Run:
        """The run a score job writes, when the job announced its id."""
        if "run_id" not in self.ids:
            raise NotFoundError(f"job {self.job_id} announced no run id ({self.kind} job)")
        return Run(self.conn, str(self.ids["run_id"]), {})
