"""The wire between a job and the CLI: a job's result and its error (with the exit code its class
carries) travel as one marked log line each, and bad input found only on the cluster ends as
exit code 2 in the caller, as it would had the CLI caught it.

No Ray here: ``jobs.entry.main`` fails before it connects, and the SDK is given a stub for the
Ray Jobs API client only (its submit and wait); the spec, precheck and lake are the real ones.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medray.cluster.infra import jobs_client, wire
from medray.jobs import entry, sdk
from medray.workers.errors import (
    ConfigError,
    ImageError,
    InfraError,
    InputError,
    JobFailedError,
    MedrayError,
    NotFoundError,
    PermanentStorageError,
)


def test_exit_codes_live_on_the_error_classes() -> None:
    assert InputError.exit_code == 2
    bad_input: tuple[type[InputError], ...] = (ConfigError, NotFoundError, ImageError)
    for cls in bad_input:
        assert issubclass(cls, InputError) and cls("x").exit_code == 2
    others: tuple[type[MedrayError], ...] = (MedrayError, InfraError, PermanentStorageError)
    for other in others:
        assert not issubclass(other, InputError) and other("x").exit_code == 1
    assert JobFailedError("x").exit_code == 1
    assert JobFailedError("x", exit_code=2).exit_code == 2


# ---------------------------------------------------------------------------------- the markers
def test_result_round_trip_cleans_what_json_cannot_carry() -> None:
    result = {"run_id": "r1", "images": np.int64(3), "auroc": float("nan"),
              "scores": np.array([0.5, 1.0]), "pair": (1, 2)}
    line = wire.result_line(result)
    assert line.startswith("MEDRAY_RESULT ") and "\n" not in line
    logs = f"some output\n{line}\nray: job finished\n"
    assert wire.result_from_logs(logs) == {"run_id": "r1", "images": 3, "auroc": None,
                                           "scores": [0.5, 1.0], "pair": [1, 2]}


@pytest.mark.parametrize("code", [1, 2])
def test_error_round_trip_keeps_the_exit_code(code: int) -> None:
    message = 'label "x" unknown: use one of normal, pneumonia\n(second line)'
    logs = f"Traceback ...\n{wire.error_line(message, code)}\n"
    assert wire.error_from_logs(logs) == (message, code)


def test_the_last_marker_wins_and_none_means_none() -> None:
    logs = "\n".join([wire.result_line({"n": 1}), "noise", wire.result_line({"n": 2})])
    assert wire.result_from_logs(logs) == {"n": 2}
    assert wire.result_from_logs("no marker here") is None
    assert wire.error_from_logs("no marker here") is None


def test_a_garbled_error_line_is_a_failed_job() -> None:
    assert wire.error_from_logs(wire.ERROR + "not json") == ("not json", 1)


def test_json_is_strict_about_nan() -> None:
    """The result line must be strict JSON: a reader in another language rejects NaN."""
    line = wire.result_line({"x": math.inf, "y": [math.nan]})
    json.loads(line.removeprefix(wire.RESULT), parse_constant=_reject)


def _reject(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON")


# ---------------------------------------------------------------------------------- the job side
@pytest.fixture
def medray_logging() -> Iterator[None]:
    """entry.main configures medray's log handler on this test's captured stdout: undo it."""
    logger = logging.getLogger("medray")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


def _payload(values: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode()


def test_bad_input_found_in_the_job_exits_2_with_the_error_line(
    medray_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {"kind": "stage", "source": "/data", "dataset": "cxr", "image_sise": 64}
    assert entry.main(["stage", "--spec", _payload(spec)]) == 2
    out = capsys.readouterr().out
    error = wire.error_from_logs(out)
    assert error is not None, out
    message, code = error
    assert code == 2
    assert "image_sise" in message and "did you mean 'image_size'" in message
    assert wire.result_from_logs(out) is None


def test_an_unexpected_error_in_the_job_exits_1(
    medray_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert entry.main(["stage", "--spec", "%%% not base64 json"]) == 1
    error = wire.error_from_logs(capsys.readouterr().out)
    assert error is not None and error[1] == 1


# ---------------------------------------------------------------------------------- the CLI side
class StubJobsAPI:
    """Stands in for the Ray Jobs API client: records the submission, replays given logs."""

    def __init__(self, status: str, logs: str) -> None:
        self.status, self.logs = status, logs
        self.submitted: list[str] = []

    def submit(self, spec: Any, address: str | None, job_id: str | None = None,
               **_: Any) -> str:
        self.submitted.append(spec.kind)
        return str(job_id)

    def wait(self, job_id: str, address: str | None, **_: Any) -> tuple[str, str]:
        return self.status, self.logs


def _submit_stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stub: StubJobsAPI) -> Any:
    monkeypatch.setattr(jobs_client, "submit", stub.submit)
    monkeypatch.setattr(jobs_client, "wait", stub.wait)
    values = {"source": str(tmp_path / "src"), "dataset": "cxr", "lake": str(tmp_path / "lake")}
    return sdk.submit("stage", values, address="http://127.0.0.1:1")


def test_sdk_turns_an_exit_2_error_line_into_exit_code_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    logs = "staging...\n" + wire.error_line("column 'Finding Labels' is missing", 2) + "\n"
    stub = StubJobsAPI("FAILED", logs)
    with pytest.raises(JobFailedError) as caught:
        _submit_stage(monkeypatch, tmp_path, stub)
    assert stub.submitted == ["stage"]
    assert caught.value.exit_code == 2
    assert "column 'Finding Labels' is missing" in caught.value.message


def test_the_exit_code_of_the_job_entry_reaches_the_sdk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, medray_logging: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """End to end without Ray: what entry.main prints for bad input is what the SDK reads."""
    spec = {"kind": "stage", "source": "/data", "dataset": "bad name!"}
    assert entry.main(["stage", "--spec", _payload(spec)]) == 2
    printed = capsys.readouterr().out
    with pytest.raises(JobFailedError) as caught:
        _submit_stage(monkeypatch, tmp_path, StubJobsAPI("FAILED", printed))
    assert caught.value.exit_code == 2 and "dataset 'bad name!'" in caught.value.message


def test_a_job_that_died_without_an_error_line_exits_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    stub = StubJobsAPI("FAILED", "Killed\n")
    with pytest.raises(JobFailedError) as caught:
        _submit_stage(monkeypatch, tmp_path, stub)
    assert caught.value.exit_code == 1 and "Killed" in caught.value.message


def test_a_succeeded_job_returns_its_result_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    logs = wire.result_line({"dataset": "cxr", "version": 1, "images": 10}) + "\n"
    result = _submit_stage(monkeypatch, tmp_path, StubJobsAPI("SUCCEEDED", logs))
    assert result["images"] == 10 and result["job_id"].startswith("medray-stage-")
