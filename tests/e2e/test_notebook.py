"""docs/pneumonia.ipynb run top to bottom in a real Jupyter kernel (nbclient + ipykernel, the
venv's ``python3``), against the session's Ray cluster and S3 server, with small settings
(``MEDRAY_NOTEBOOK_SETTINGS``): any cell that raises fails the test, and the outputs the notebook
promises are checked against the lake."""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from medray.cluster.infra import env
from medray.cluster.store import catalog, history, layout, runs
from medray.cluster.store.lake import Lake
from tests.support.paths import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.slow]

NOTEBOOK = ROOT / "docs" / "pneumonia.ipynb"
PER_SPLIT = 100  # images per split (half of each class): seconds per job on 2 cores


@pytest.fixture(scope="module")
def executed(s3_server, ray_cluster, pneumonia_npz, tmp_path_factory) -> dict[str, Any]:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    lake = f"s3://{s3_server['bucket']}/nb-{uuid.uuid4().hex[:8]}"
    settings = {"data": str(pneumonia_npz), "per_split": PER_SPLIT, "epochs": 2,
                "batch_size": 32, "n_boot": 50}
    # the kernel inherits the session's MEDRAY_HOME: the local cluster and the embedded lake's
    # credentials are found there, as `medray cluster up` and `medray lake up` leave them
    kernel_env = {**os.environ, env.LAKE: lake, env.NOTEBOOK_SETTINGS: json.dumps(settings)}
    client = NotebookClient(nb, kernel_name="python3", timeout=900,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    try:
        client.execute(env=kernel_env)  # a cell that raises raises CellExecutionError here
    finally:  # what the notebook showed, to open after a failure
        nbformat.write(nb, tmp_path_factory.mktemp("notebook") / NOTEBOOK.name)
    return {"nb": nb, "lake": lake}


def _tagged(nb: nbformat.NotebookNode, tag: str) -> nbformat.NotebookNode:
    (cell,) = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    return cell


def _result(cell: nbformat.NotebookNode, mime: str) -> str:
    (out,) = [o for o in cell.outputs if o.output_type == "execute_result"]
    return str(out.data[mime])


def test_every_cell_runs_without_an_error(executed):
    code = [c for c in executed["nb"].cells if c.cell_type == "code"]
    assert code and all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert errors == []


def test_predictions_have_one_row_per_test_image(executed):
    lake = Lake(executed["lake"])
    _, _, manifest = catalog.resolve(lake, "pneumoniamnist")
    test_images = sum(manifest["counts"]["test"].values())  # one label per image
    assert PER_SPLIT * 0.9 <= test_images <= PER_SPLIT  # the cut, less exact duplicates
    shown = _result(_tagged(executed["nb"], "predictions-count"), "text/plain")
    assert shown == str(test_images)
    (job,) = history.list_history(lake, kind="score")  # this lake's: the notebook's one run
    assert runs.read_predictions(lake, job["run_id"]).num_rows == test_images


def test_the_report_renders_inline_as_html(executed):
    (job,) = history.list_history(Lake(executed["lake"]), kind="report")
    page = _result(_tagged(executed["nb"], "report"), "text/html")
    assert page.startswith("<iframe") and f"medray report {job['run_id']}" in page
    assert "AUROC" in page


def test_the_notebook_shows_progress_not_job_logs(executed):
    streams = "".join(o.get("text", "") for c in executed["nb"].cells
                      if c.cell_type == "code" for o in c.outputs)
    for noise in ("MEDRAY_RESULT", "MEDRAY_EVENT", "--spec", "[job medray-"):
        assert noise not in streams
    # the bars are widgets: their last text is in the notebook's widget state (tqdm writes
    # figure spaces where a terminal bar has spaces)
    widgets = json.dumps(executed["nb"].metadata.get("widgets", {}), ensure_ascii=False)
    widgets = widgets.replace("\u2007", " ")
    for kind in ("stage", "train", "score", "report"):
        assert f"medray {kind}: SUCCEEDED" in widgets


def test_the_calibration_check_agrees_with_the_report(executed):
    cell = _tagged(executed["nb"], "calibration")
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    found = re.search(r"expected calibration error: ([0-9.]+) here, ([0-9.]+) in the report", text)
    assert found, text
    lake = Lake(executed["lake"])
    (job,) = history.list_history(lake, kind="report")
    table = lake.read_parquet(layout.run_report_table(job["run_id"], "per_label_metrics"))
    reported = dict(zip(table.column("label").to_pylist(), table.column("ece").to_pylist(),
                        strict=True))["pneumonia"]
    # the notebook's own ten-bin reliability table, from the predictions, gives the report's ECE
    assert float(found.group(1)) == pytest.approx(reported, abs=1e-4)
    assert float(found.group(2)) == pytest.approx(reported, abs=1e-4)
