"""A training job killed mid-way continues with --resume from its last checkpoint: epochs
already done are not trained again, and nothing half-trained is registered meanwhile."""

from __future__ import annotations

import json
import re
import uuid

import pytest

from tests.support import faults as h

pytestmark = [pytest.mark.integration]


def _train_args(pipe: h.Pipeline, model: str, run_id: str, epochs: int, *extra: str) -> list[str]:
    return ["train", "--dataset", "pneu", "--model", model, "--epochs", str(epochs),
            "--batch-size", "32", "--patience", "10", "--run-id", run_id, "--lake", pipe.lake,
            *extra]


def _ckpt(fs, pipe: h.Pipeline, model: str, run_id: str) -> dict | None:
    path = f"{h.lake_base(pipe.lake)}/models/{model}/_training/{run_id}/checkpoints/latest.json"
    return json.loads(h.read_object(fs, path)) if h.exists(fs, path) else None


def _registered(fs, pipe: h.Pipeline, model: str) -> bool:
    return h.exists(fs, f"{h.lake_base(pipe.lake)}/models/{model}/1/card.json")


def _resume_and_check(fs, pipe: h.Pipeline, model: str, run_id: str, epochs: int,
                      done: int, history_before: list[dict]) -> None:
    proc = h.cli(None, *_train_args(pipe, model, run_id, epochs, "--resume", "--json",
                                    "--verbose"),
                 timeout=900)
    resumed = re.findall(r"resumed from (?:the checkpoint of )?epoch (\d+)",
                         proc.stderr + proc.stdout)
    assert all(int(e) >= done for e in resumed), resumed
    card = json.loads(h.read_object(fs, f"{h.lake_base(pipe.lake)}/models/{model}/1/card.json"))
    history = card["metrics"]["history"]
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    # epochs before the fault come from the checkpoint, not from training them again: their
    # records (loss, seconds, throughput) are the ones written before the fault, to the bit
    assert len(history_before) >= done
    for before, after in zip(history_before, history, strict=False):
        assert before == after


@pytest.mark.slow
def test_training_killed_twice_resumes_from_its_checkpoints(pipeline, ray_cluster, medray_home):
    """One training, two faults: the job exits after epoch 1 (the MEDRAY_FAULT hook), then the
    resumed job's driver is SIGKILLed after a later checkpoint; a second --resume finishes.
    Done epochs are never trained again and nothing is registered before the end."""
    fs = h.s3fs(medray_home)
    model, run_id, epochs = "killresume", f"kill-{uuid.uuid4().hex[:6]}", 4
    proc = h.cli(None, *_train_args(pipeline, model, run_id, epochs), check=False, timeout=900,
                 env={"MEDRAY_FAULT": "train_exit_after_epoch:1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    latest = _ckpt(fs, pipeline, model, run_id)
    assert latest and latest["epoch"] == 1
    assert not _registered(fs, pipeline, model), "a failed training registered a model"
    first = _state(fs, pipeline, latest)

    res = h.cli_json(None, *_train_args(pipeline, model, run_id, epochs, "--resume",
                                        "--no-wait"))
    latest = h.wait_for("a checkpoint after epoch 1",
                        lambda: (c := _ckpt(fs, pipeline, model, run_id)) and c["epoch"] >= 2
                        and c, 600, every=0.2)
    drivers = [p for p, spec in h.job_drivers(ray_cluster["temp_dir"], "train")
               if spec.get("run_id") == run_id]
    assert len(drivers) == 1
    h.sigkill(drivers)
    assert not _registered(fs, pipeline, model), "training ended before the driver was killed"
    assert h.wait_job(medray_home, res["job_id"], 120) == "FAILED"  # a SIGKILLed driver
    assert not _registered(fs, pipeline, model)
    latest = _ckpt(fs, pipeline, model, run_id)
    second = _state(fs, pipeline, latest)
    assert second["history"][:1] == first["history"], "the first resume retrained epoch 1"
    _resume_and_check(fs, pipeline, model, run_id, epochs, latest["epoch"], second["history"])


def _state(fs, pipe: h.Pipeline, latest: dict) -> dict:
    return json.loads(h.read_object(fs, f"{h.lake_base(pipe.lake)}/{latest['dir']}/state.json"))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["driver", "workers"])
def test_storage_trouble_mid_training_trains_again_from_its_checkpoint(
        pipeline, ray_cluster, medray_home, where):
    """A retryable error after epoch 1's checkpoint trains again from that checkpoint in the same
    job, which registers its model with epoch 1 trained once. "driver": a one-worker CPU
    training runs its loop in the job's driver (cluster/train/in_driver.py), which retries in
    the same process; "workers": two Ray Train workers, whose controller restarts the group
    (the retryable error passes restarts.FailFast) in new processes."""
    fs = h.s3fs(medray_home)
    model, run_id, epochs = f"retry{where}", f"retry-{uuid.uuid4().hex[:6]}", 3
    extra = ("--workers", "2", "--cpus-per-worker", "0.5") if where == "workers" else ()
    proc = h.cli(None, *_train_args(pipeline, model, run_id, epochs, *extra, "--json",
                                    "--verbose"),
                 timeout=900, env={"MEDRAY_FAULT": "train_fail_after_epoch:1"})
    said = proc.stdout + proc.stderr
    ran = "in this job's driver" if where == "driver" else "on 2 Ray Train worker(s)"
    assert f"the training loop runs {ran}" in said, said[-3000:]
    assert "MEDRAY_FAULT: storage trouble injected after epoch 1" in said, said[-3000:]
    if where == "driver":
        assert "training again from the last checkpoint (1 of 3)" in said, said[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["restarts"] == 1 and result["resumed_from_epochs"] == [1], result
    assert result["version"] == 1
    card = json.loads(h.read_object(fs, f"{h.lake_base(pipeline.lake)}/models/{model}/1/card.json"))
    assert [r["epoch"] for r in card["metrics"]["history"]] == [1, 2, 3]
    ranks = f"{h.lake_base(pipeline.lake)}/models/{model}/_training/{run_id}/ranks"
    rank0 = [p for p in h.lake_files(fs, ranks) if p.endswith("-rank0.json")]
    assert len(rank0) == 1, rank0
    record = json.loads(h.read_object(fs, rank0[0]))
    # the second attempt resumed after epoch 1: in the driver's own process, or in a new worker
    assert [a["resumed_from_epoch"] for a in record["attempts"]] == [0, 1], record
    assert len({a["pid"] for a in record["attempts"]}) == (1 if where == "driver" else 2), record
    assert sorted(record["epochs"], key=int) == ["1", "2", "3"], record
