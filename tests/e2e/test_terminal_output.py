"""What a person sees: stage -> train -> score -> report through the real CLI, once, on tiny data,
on the session's Ray cluster and S3 lake, with output captured as CI or `| tee` would see it.

Each human output holds its progress lines and its summary and nothing of the job's plumbing
(the entrypoint's base64 spec, TensorFlow's C++ start-up, Ray's warnings, the result marker),
and no control character; ``--no-wait --json`` prints one JSON line with every id the job then
uses; ``medray report --output DIR`` writes the HTML page at the ``file://`` path it prints.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_cli
from tests.support.data import small_npz
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

# what must never reach a person's terminal by default
PLUMBING = (
    "--spec", "eyJ",  # the entrypoint line and its base64 JSON spec ('{"' is 'eyJ')
    "cudart_stub", "cuInit", "cuda_", "absl", "oneDNN", "tensorflow/", "TF_",  # TensorFlow
    "Progress bars disabled", "Deprecat", "deprecat", "WARNING", "(raylet)",  # Ray
    "[repeated", "RayTrainWorker", "MEDRAY_RESULT", "MEDRAY_EVENT", "Traceback",
)


def _json_only(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """``--json``'s contract: stdout is exactly one line, a JSON object."""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]
    doc: dict[str, Any] = json.loads(lines[0])
    return doc


def _finished(job_id: str, lake: str) -> dict[str, Any]:
    """The lake's record of a --no-wait job, once it has ended."""
    wait_for(f"job {job_id} to end", lambda: run_cli("jobs", "status", job_id).stdout.strip()
             in ("SUCCEEDED", "FAILED", "STOPPED"), timeout=600, every=2)
    record: dict[str, Any] = json.loads(run_cli("jobs", "show", job_id, "--lake", lake,
                                                "--json").stdout.splitlines()[-1])
    assert record["status"] == "SUCCEEDED", record
    return record


@pytest.fixture(scope="module")
def seen(tmp_path_factory, s3_server, ray_cluster) -> dict[str, Any]:
    """Every command's output, from one pipeline on tiny data."""
    tmp = tmp_path_factory.mktemp("terminal")
    lake = ("--lake", f"s3://{s3_server['bucket']}/term-{uuid.uuid4().hex[:8]}")
    src = str(small_npz(tmp / "small.npz", {"train": 160, "val": 60, "test": 60}))
    stage = ("stage", src, "--dataset", "tiny", "--image-size", "28", "--label-names",
             "normal,pneumonia", *lake)
    out: dict[str, Any] = {"lake": lake[1], "report_dir": tmp / "report"}
    out["stage"] = run_cli(*stage)
    out["stage_ids"] = run_cli(*stage, "--no-wait", "--json")
    out["stage_job"] = _finished(_json_only(out["stage_ids"])["job_id"], lake[1])
    train = ("train", "--dataset", "tiny", "--model", "tcnn", "--epochs", "1", *lake)
    out["train"] = run_cli(*train)
    out["train_ids"] = run_cli(*train, "--no-wait", "--json")
    out["train_job"] = _finished(_json_only(out["train_ids"])["job_id"], lake[1])
    score = ("score", "--dataset", "tiny", "--model", "tcnn:1", "--split", "test", *lake)
    out["score"] = run_cli(*score)
    out["score_ids"] = run_cli(*score, "--no-wait", "--json")
    out["score_job"] = _finished(_json_only(out["score_ids"])["job_id"], lake[1])
    run_id = _json_only(out["score_ids"])["run_id"]
    out["report"] = run_cli("report", run_id, "--n-boot", "20", "--output",
                            str(out["report_dir"]), *lake)
    return out


@pytest.mark.parametrize("command", ["stage", "train", "score", "report"])
def test_human_output_has_progress_and_a_summary_and_no_plumbing(seen, command):
    proc = seen[command]
    shown = proc.stdout + proc.stderr
    for noise in PLUMBING:
        assert noise not in shown, f"{noise!r} in the output of {command}:\n{shown[-4000:]}"
    assert "\x1b" not in shown  # not a terminal: no colour, no cursor movement
    progress_done = {"stage": "staging tiny:1: done, 280/280 files",
                     "train": "epoch 1/1: done", "score": "scoring: done",
                     "report": "report: done, 5/5 steps"}[command]
    assert progress_done in proc.stderr, proc.stderr
    summary = {"stage": ("staged tiny:1", "medray train --dataset tiny:1"),
               "train": ("registered tcnn:1", "medray score --dataset tiny --model tcnn:1"),
               "score": ("images scored", "medray report "),
               "report": ("report:", "file://")}[command]
    for text in summary:
        assert text in proc.stdout, proc.stdout
    assert "next:" in proc.stdout


def test_training_shows_each_epoch_once_with_its_validation_auroc(seen):
    lines = [x for x in seen["train"].stderr.splitlines() if x.startswith("epoch 1/1: done")]
    assert len(lines) == 1, seen["train"].stderr
    assert re.search(r"val AUROC (0|1)\.\d{4}", lines[0]) and "s/epoch" in lines[0]


def test_no_wait_json_names_the_ids_the_finished_job_used(seen):
    stage = _json_only(seen["stage_ids"])
    assert stage["dataset"] == "tiny" == seen["stage_job"]["dataset"]
    assert seen["stage_job"]["dataset_version"] == 2  # claimed by the job, shown once claimed
    train = _json_only(seen["train_ids"])
    result = seen["train_job"]["result"]
    assert train["training_id"] and train["training_id"] == result["training_id"]
    assert train["model"] == "tcnn" == result["model"]
    score = _json_only(seen["score_ids"])
    assert score["run_id"] and score["run_id"] == seen["score_job"]["run_id"]
    assert seen["score_job"]["result"]["run_id"] == score["run_id"]


def test_report_writes_the_html_page_at_the_printed_file_url(seen):
    urls = re.findall(r"file://\S+", seen["report"].stdout)
    assert urls, seen["report"].stdout
    page = Path(urls[0].removeprefix("file://"))
    assert page == seen["report_dir"].resolve() / "report.html"
    assert page.read_text().lstrip().lower().startswith("<!doctype html")
