"""The notebook SDK (``import medray``, jobs/notebook.py) without a cluster: what importing it
loads, its options against the job specs, committed-only readers on a local lake (a dataset
staged by the real stage job without Ray, runs and reports written in the lake's format),
the errors for names the lake lacks, and the progress bars built from progress events."""

from __future__ import annotations

import inspect
import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from tqdm import tqdm

from medray.cluster.infra import wire
from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.jobs import notebook
from medray.jobs.notebook_progress import NotebookProgress
from medray.workers.errors import ConfigError, NotFoundError
from medray.workers.specs import SPECS
from tests.support.staging import stage_inline


def test_import_medray_loads_neither_ray_nor_tensorflow(tmp_path):
    code = ("import sys, medray\n"
            "mr = medray.connect(lake=sys.argv[1])\n"
            "print(type(mr).__name__, sorted(m for m in ('ray', 'tensorflow', 'keras') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lake")],
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.split() == ["Connection", "[]"]


@pytest.mark.parametrize("kind", ["stage", "train", "score", "report"])
def test_job_functions_take_only_spec_options_and_document_every_one(kind):
    fn = getattr(notebook.Connection, kind)
    spec = SPECS[kind]
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.name not in ("self", "wait") and p.kind is not p.VAR_KEYWORD]
    # report's first parameter is the run (run_id in the spec)
    names = {"run_id" if (kind, p.name) == ("report", "run") else p.name for p in params}
    assert names <= set(spec.model_fields), names - set(spec.model_fields)
    for name in set(spec.model_fields) - {"kind", "lake"}:
        assert f"        {name}: " in (fn.__doc__ or ""), f"{kind}: {name} undocumented"


# ------------------------------------------------------------------------ a small local lake
@pytest.fixture
def lake_with_dataset(tmp_path, monkeypatch) -> tuple[str, dict]:
    rng = np.random.default_rng(0)
    src = tmp_path / "tiny.npz"
    n = 40
    np.savez(src, train_images=rng.integers(0, 256, (n, 12, 12), dtype=np.uint8),
             train_labels=rng.integers(0, 2, (n, 1)),
             test_images=rng.integers(0, 256, (10, 12, 12), dtype=np.uint8),
             test_labels=rng.integers(0, 2, (10, 1)))
    lake = str(tmp_path / "lake")
    staged = stage_inline(monkeypatch, source=str(src), dataset="pneu", lake=lake,
                          label_names=["normal", "pneumonia"])
    return lake, staged


def test_dataset_table_reads_the_committed_version_without_image_bytes(lake_with_dataset):
    lake, staged = lake_with_dataset
    mr = notebook.connect(lake=lake)
    ds = mr.dataset("pneu")
    assert (ds.name, ds.version, str(ds)) == ("pneu", 1, "pneu:1")
    table = ds.table()
    assert len(table) == staged["images"] == ds.manifest()["images"]
    assert "pixels" not in table.columns and "image_id" in table.columns
    test = ds.table(columns=["image_id"], split="test")
    assert list(test.columns) == ["image_id"]
    assert len(test) == 10  # the source's test split, kept
    with pytest.raises(ConfigError, match="no column"):
        ds.table(columns=["no_such_column"])
    frame = mr.datasets()
    assert frame[["dataset", "version"]].values.tolist() == [["pneu", 1]]


def test_a_missing_dataset_or_model_names_what_exists_before_anything_is_submitted(
        lake_with_dataset):
    lake, _ = lake_with_dataset
    # nothing listens there: a submission would fail with InfraError, not NotFoundError
    mr = notebook.connect(lake=lake, address="http://127.0.0.1:9")
    with pytest.raises(NotFoundError) as err:
        mr.train(dataset="pnue", model="cnn")
    assert "no dataset 'pnue'" in err.value.message and "it has: pneu" in err.value.message
    assert "mr.stage(SOURCE, dataset='pnue')" in err.value.message
    with pytest.raises(NotFoundError) as err:
        mr.score(dataset="pneu", model="cnn:1")
    assert "no model 'cnn'" in err.value.message and "it has: none" in err.value.message
    assert "mr.train(" in err.value.message


def test_empty_listings_are_dataframes_with_their_columns(tmp_path):
    mr = notebook.connect(lake=str(tmp_path / "empty"))
    assert list(mr.models().columns)[:2] == ["model", "version"] and mr.models().empty
    assert list(mr.datasets().columns)[:2] == ["dataset", "version"]


# ------------------------------------------------------------------------ runs and reports
def _prediction_file(lake: Lake, run_id: str, name: str, ids: list[str]) -> str:
    rel = f"predictions/{name}.parquet"
    lake.write_parquet(layout.run_file(run_id, rel), pa.table(
        {"image_id": ids, "score_pneumonia": [0.9] * len(ids), "run_id": [run_id] * len(ids)}))
    return rel


def test_run_data_is_read_only_once_committed_and_only_from_listed_files(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run_id = "cnn-v1-test"
    listed = _prediction_file(lake, run_id, "a", ["i1", "i2", "i3"])
    _prediction_file(lake, run_id, "stray", ["x1"])  # an abandoned attempt's file
    run = notebook.connect(lake=lake.uri).run(run_id)
    with pytest.raises(NotFoundError, match="not committed") as err:
        run.predictions()
    assert f"run_id={run_id!r}" in err.value.message  # names the resume
    with pytest.raises(NotFoundError, match="not committed"):
        run.errors()
    lake.write_json(layout.run_commit(run_id),
                    {"files": [listed], "error_files": [], "labels": ["normal", "pneumonia"]})
    assert sorted(run.predictions()["image_id"]) == ["i1", "i2", "i3"]
    assert run.errors().empty
    with pytest.raises(NotFoundError, match=r"no committed report: make one with mr.report"):
        run.metrics()


def test_a_report_renders_inline_only_once_committed(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    run_id = "cnn-v1-rep"
    lake.write_json(layout.run_commit(run_id), {"files": [], "error_files": [], "labels": []})
    page = '<html><body><h1>Run "cnn-v1-rep"</h1><style>h1{color:red}</style></body></html>'
    lake.write_bytes(layout.run_report_html(run_id), page.encode())
    lake.write_parquet(layout.run_report_table(run_id, "per_label_metrics"),
                       pa.table({"label": ["pneumonia"], "auroc": [0.91]}))
    run = notebook.connect(lake=lake.uri).run(run_id)
    with pytest.raises(NotFoundError, match="no committed report"):
        run.report()  # written but not committed: a report being rewritten
    lake.write_json(layout.run_report_commit(run_id), {"run_id": run_id})
    report = run.report()
    shown = report._repr_html_()
    assert shown.startswith("<iframe") and "&lt;h1&gt;Run &quot;cnn-v1-rep&quot;" in shown
    assert "<style>" not in shown  # the page's styles stay inside its frame
    assert run.metrics().to_dict("records") == [{"label": "pneumonia", "auroc": 0.91}]
    saved = report.save(tmp_path / "out" / "report.html")
    assert saved.read_text() == page


# ------------------------------------------------------------------------ progress bars
def _event(**kw) -> str:
    return f"(RayTrainWorker pid=1) {wire.event_line(kw)}\n"


def test_progress_events_become_bars_and_other_log_lines_are_left_out(capsys):
    out = io.StringIO()
    made: list[tqdm] = []

    def factory(**kw):
        bar = tqdm(file=out, mininterval=0, **kw)
        made.append(bar)
        return bar

    progress = NotebookProgress("score", factory=factory)
    assert progress.status == "PENDING"
    first = _event(phase="scoring", unit="images", done=40, total=120, elapsed=2.0,
                   final=False, fields={"shards": 1, "errors": 0})
    # a chunk may end in the middle of a line: the rest comes with the next poll
    progress("2026-01-01 INFO [job j] secret-free log line\n" + first[:25])
    assert progress.status == "RUNNING" and len(made) == 1
    progress(first[25:] + wire.EVENT + json.dumps({"note": "no validation split"}) + "\n")
    bar = made[1]
    assert (bar.desc, bar.total, bar.n) == ("scoring", 120, 40)
    progress(_event(phase="scoring", unit="images", done=120, total=120, elapsed=5.0,
                    final=True, fields={"shards": 3, "errors": 0}))
    assert bar.n == 120 and bar.disable  # its final event closed it
    progress.close("SUCCEEDED")
    text = out.getvalue()
    assert capsys.readouterr().out == "warning: no validation split\n"  # printed above the bars
    assert "secret-free log line" not in text and wire.EVENT not in text
    assert "medray score: SUCCEEDED" in text
    assert "120/120" in text and "shards=3" in text


def test_a_job_call_passes_only_the_options_given_and_returns_what_the_job_made(
        tmp_path, monkeypatch):
    calls: list[dict] = []

    def submit(kind, values, address=None, wait=True, on_log=None):  # the SDK's, recorded
        calls.append({"kind": kind, "values": values, "address": address, "wait": wait})
        if not wait:
            return {"job_id": "medray-stage-2", "status": "PENDING"}
        on_log(wire.event_line({"phase": "staging", "unit": "files", "done": 1, "total": 1,
                                "elapsed": 0.1, "final": True, "fields": {}}) + "\n")
        return {"job_id": "medray-stage-1", "dataset": "pneu", "version": 3, "images": 5}

    monkeypatch.setattr(notebook.sdk, "submit", submit)
    (tmp_path / "x.npz").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    mr = notebook.connect(lake=str(tmp_path / "lake"), address="http://127.0.0.1:9")
    ds = mr.stage("x.npz", dataset="pneu", image_size=28)
    assert calls[0] == {"kind": "stage", "address": "http://127.0.0.1:9", "wait": True,
                        "values": {"source": str(tmp_path / "x.npz"), "dataset": "pneu",
                                   "image_size": 28, "lake": mr.lake}}
    assert (ds.name, ds.version, ds.result["images"]) == ("pneu", 3, 5)
    job = mr.stage("x.npz", dataset="pneu", wait=False, max_pixels=1000)
    assert calls[1]["values"]["max_pixels"] == 1000 and calls[1]["wait"] is False
    assert isinstance(job, notebook.Job) and job.job_id == "medray-stage-2"
