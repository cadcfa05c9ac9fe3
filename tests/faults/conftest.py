"""Fixtures of the fault suite: the shared tiny pipeline, a deliberately slow registered model
and the clean score run that every faulted run is compared with."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from tests.support import faults as h


@dataclass
class ScoringSetup:
    pipe: h.Pipeline
    home: Path
    temp_dir: str
    fs: object
    model: str
    ref: pa.Table
    ref_run: str

    def score_args(self, run_id: str, *extra: str) -> list[str]:
        # batches of 16 rows: an actor is almost always inside a batch when it is killed
        return ["score", "--dataset", "pneu", "--model", self.model, "--split", "test",
                "--batch-size", "16", "--run-id", run_id, "--lake", self.pipe.lake, *extra]

    def start(self, run_id: str, *extra: str, env: dict | None = None) -> str:
        res = h.cli_json(None, *self.score_args(run_id, *extra), "--no-wait", env=env)
        return str(res["job_id"])

    def first_shard_written(self, run_id: str, timeout: float = 180) -> None:
        """Wait until the run has written at least one prediction file and is not committed."""
        run_dir = f"{h.lake_base(self.pipe.lake)}/runs/{run_id}"

        def check() -> bool:
            files = h.lake_files(self.fs, f"{run_dir}/predictions")
            assert not h.exists(self.fs, f"{run_dir}/_COMMITTED.json"), \
                "the run committed before the fault could be injected: make the model slower"
            return bool(files)

        h.wait_for(f"a first prediction file of {run_id}", check, timeout, every=0.1)

    def is_committed(self, run_id: str) -> bool:
        return h.exists(self.fs, f"{h.lake_base(self.pipe.lake)}/runs/{run_id}/_COMMITTED.json")


@pytest.fixture(scope="session")
def pipeline(s3_server, ray_cluster, tmp_path_factory) -> h.Pipeline:
    return h.shared_pipeline(s3_server["bucket"], tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def scoring(pipeline, medray_home, ray_cluster, tmp_path_factory) -> ScoringSetup:
    model_file = h.build_slow_model(tmp_path_factory.mktemp("slow") / "slow.keras")
    h.cli(None, "models", "register", str(model_file), "--name", "slow", "--labels",
          ",".join(h.LABELS), "--lake", pipeline.lake)
    fs = h.s3fs(medray_home)
    setup = ScoringSetup(pipeline, medray_home, ray_cluster["temp_dir"], fs, "slow:1",
                         pa.table({}), "")
    run_id = f"clean-{uuid.uuid4().hex[:6]}"
    h.cli(None, *setup.score_args(run_id))
    marker, ref = h.committed(fs, pipeline.lake, run_id)
    # every staged test image, once (of the 240 generated, byte-identical ones are kept once)
    manifest = json.loads(h.read_object(fs, f"{h.lake_base(pipeline.lake)}/datasets/pneu/1/"
                                            "manifest.json"))
    assert marker["images"] == ref.num_rows == manifest["images_by_split"]["test"] > 200
    assert marker["errors"] == 0
    setup.ref, setup.ref_run = ref, run_id
    return setup


@dataclass
class MultiNode:
    home: Path
    temp_dir: str
    env: dict
    info: dict


@pytest.fixture(scope="module")
def multinode(scoring, tmp_path_factory) -> Iterator[MultiNode]:
    """A second local cluster (head + 2 worker raylets) under its own MEDRAY_HOME, started and
    stopped through the CLI, using the session's S3 lake (its lake.json points at the same
    server and credentials file)."""
    home = Path(f"/tmp/mr-mn-{uuid.uuid4().hex[:6]}")  # noqa: S108 - short: Ray socket paths
    (home / "lake").mkdir(parents=True, mode=0o700)
    shutil.copy(scoring.home / "lake" / "lake.json", home / "lake" / "lake.json")
    # a dead node is noticed in ~3 s instead of Ray's default ~15 s
    env = {"MEDRAY_HOME": str(home), "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000"}
    try:
        info = h.cli_json(None, "cluster", "up", "--nodes", "3", "--num-cpus", "1", env=env,
                          timeout=400)
        yield MultiNode(home, info["temp_dir"], env, info)
    finally:
        # idempotent: test_cluster_down_cli_stops_every_process may have stopped it already
        subprocess.run([sys.executable, "-c", "from medray.cluster.infra import ray_local; "
                        "ray_local.down()"], env={**os.environ, **env}, timeout=120, check=False)
        shutil.rmtree(home, ignore_errors=True)
