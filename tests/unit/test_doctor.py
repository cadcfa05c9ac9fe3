"""The logic of each ``medray doctor`` check, without Ray or an S3 server: where credentials come
from, which fix a lake error gets, the version and spill-disk verdicts, the node parsing, and
the probe on a local lake."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from medray.cluster.infra import doctor
from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from tests.support.cli import run_cli

GIB = 1024**3


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS variables, an empty MEDRAY_HOME (no embedded lake) and no ~/.aws file."""
    for key in list(os.environ):
        if key.startswith("AWS_") or key.startswith("RAY_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("MEDRAY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return tmp_path


def test_local_lake_needs_no_credentials(no_aws: Path) -> None:
    check = doctor.credentials_source(str(no_aws / "lake"))
    assert check.ok and check.detail == "none needed: the lake is a local folder"


def test_credentials_from_the_environment_are_named_not_printed(
    no_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASECRETVALUE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret")
    check = doctor.credentials_source("s3://bucket/lake")
    assert check.ok and check.detail == "from the environment (AWS_ACCESS_KEY_ID)"
    assert "AKIASECRETVALUE" not in check.line() and "very-secret" not in check.line()


def test_a_key_id_without_its_secret_is_a_problem(
    no_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASECRETVALUE")
    check = doctor.credentials_source("s3://bucket/lake")
    assert not check.ok and "AWS_SECRET_ACCESS_KEY" in check.fix


def test_credentials_from_the_shared_file(no_aws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = no_aws / "credentials"
    creds.write_text("[default]\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    check = doctor.credentials_source("s3://bucket/lake")
    assert check.ok and check.detail == f"the AWS credentials file {creds} (profile default)"


def test_embedded_lake_key_file_found_and_missing(no_aws: Path) -> None:
    home = no_aws / "home"
    (home / "lake").mkdir(parents=True)
    keys = home / "lake" / "credentials.json"
    cfg = {"endpoint": "http://127.0.0.1:1", "bucket": "medray", "credentials_file": str(keys)}
    (home / "lake" / "lake.json").write_text(json.dumps(cfg))
    missing = doctor.credentials_source("s3://medray/lake")
    assert not missing.ok and "medray lake up" in missing.fix
    keys.write_text("{}")
    found = doctor.credentials_source("s3://medray/lake")
    assert found.ok and found.detail == f"the embedded lake's key file ({keys})"


def test_no_credentials_anywhere_is_a_problem_with_its_fix(no_aws: Path) -> None:
    check = doctor.credentials_source("s3://bucket/lake")
    assert not check.ok
    assert "aws configure" in check.fix and "medray lake up" in check.fix


@pytest.mark.parametrize(
    ("error", "fix_part"),
    [
        (OSError("AWS Error ACCESS_DENIED during PutObject"), "AWS_SECRET_ACCESS_KEY"),
        (OSError("AWS Error INVALID_ACCESS_KEY_ID during PutObject"), "AWS_ACCESS_KEY_ID"),
        (OSError("AWS Error SIGNATURE_DOES_NOT_MATCH"), "AWS_SECRET_ACCESS_KEY"),
        (FileNotFoundError("NO_SUCH_BUCKET: bucket 'x' does not exist"), "create the bucket"),
        (OSError("curl error 7: Couldn't connect to server"), "start the S3 server"),
    ],
)
def test_lake_errors_get_their_fix(error: OSError, fix_part: str) -> None:
    assert fix_part in doctor.lake_fix(error, "s3://bucket/lake")


def test_a_read_only_local_folder_gets_chmod() -> None:
    fix = doctor.lake_fix(PermissionError(13, "Permission denied"), "/data/lake")
    assert fix == "`chmod u+rwx /data/lake` or pass another --lake"


def test_the_probe_on_a_local_lake_leaves_nothing(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    check = doctor.check_lake(str(lake))
    assert check.ok, check.detail
    assert not list((lake / layout.DOCTOR).iterdir())


def test_a_lake_that_cannot_be_written_is_a_problem(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / layout.DOCTOR).write_text("a file where the probe's folder goes")
    check = doctor.check_lake(str(lake))
    assert not check.ok and check.detail.startswith(f"{lake} is not writable")


def test_the_probe_path_lives_in_the_layout() -> None:
    assert layout.doctor_probe("abc") == f"{layout.DOCTOR}/abc.probe"
    assert Lake("/tmp").path(layout.doctor_probe("abc")) == "/tmp/_doctor/abc.probe"


def test_version_mismatch_names_the_install_command() -> None:
    same = doctor.version_check("http://h:8265", "2.60.0", "2.60.0")
    assert same.ok
    other = doctor.version_check("http://h:8265", "2.59.1", "2.60.0")
    assert not other.ok
    assert other.fix.startswith("`pip install 'ray[default]==2.59.1'`")


def test_a_port_where_nothing_listens_is_a_stopped_cluster() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes, check = doctor.check_cluster(f"127.0.0.1:{port}")
    assert nodes is None and not check.ok
    assert check.detail.startswith(f"no Ray cluster answers at http://127.0.0.1:{port}")
    assert "medray cluster up" in check.fix


def test_no_local_cluster_and_no_address(no_aws: Path) -> None:
    nodes, check = doctor.check_cluster(None)
    assert nodes is None and not check.ok and "medray cluster up" in check.fix


SUMMARY = {
    "data": {
        "summary": [
            {
                "ip": "10.0.0.1",
                "raylet": {
                    "state": "ALIVE",
                    "resourcesTotal": {"CPU": 8, "GPU": 2, "accelerator_type:A100": 1},
                },
            },
            {"ip": "10.0.0.2", "raylet": {"state": "ALIVE", "resourcesTotal": {"CPU": 4}}},
            {"ip": "10.0.0.3", "raylet": {"state": "DEAD", "resourcesTotal": {"GPU": 8}}},
        ]
    }
}


def test_gpus_per_alive_node() -> None:
    nodes = doctor.alive_nodes(SUMMARY)
    assert nodes == [
        {"node": "10.0.0.1", "gpus": 2.0, "type": "A100"},
        {"node": "10.0.0.2", "gpus": 0.0, "type": ""},
    ]
    check = doctor.check_gpus(nodes, True)
    assert check.ok and check.detail.startswith("2 GPU(s) for TensorFlow on 2 node(s)")


def test_gpus_of_a_cpu_cluster_and_of_no_cluster() -> None:
    cpu = doctor.check_gpus([{"node": "n", "gpus": 0.0, "type": ""}], True)
    assert cpu.ok and "run on CPU" in cpu.detail
    skipped = doctor.check_gpus(None, False)
    assert skipped.ok and skipped.skipped and skipped.line().startswith("skipped")
    assert not doctor.check_gpus([], True).ok


@pytest.mark.parametrize(
    ("total", "free", "ok"),
    [
        (100 * GIB, 50 * GIB, True),
        (100 * GIB, 9 * GIB, False),  # 91% used: Ray is close to its 95% spill limit
        (10 * GIB, 1 * GIB, False),  # under 2 GiB left
        (4 * GIB, 3 * GIB, True),
    ],
)
def test_spill_disk_verdict(total: int, free: int, ok: bool) -> None:
    check = doctor.spill_check("/tmp/ray", total, free)
    assert check.ok is ok
    assert bool(check.fix) is not ok


def test_a_problem_line_carries_its_fix_and_an_ok_line_none() -> None:
    bad = doctor.Check("lake", False, "s3://b/l is not writable", "`medray lake up`")
    assert bad.line() == "PROBLEM lake        s3://b/l is not writable -> fix: `medray lake up`"
    assert doctor.Check("lake", True, "fine").line() == "ok      lake        fine"


def test_run_all_fails_when_one_check_fails(no_aws: Path) -> None:
    report = doctor.run_all(str(no_aws / "lake"), "127.0.0.1:1")
    names = [c["name"] for c in report["checks"]]
    assert names == ["credentials", "lake", "cluster", "gpus", "tensorflow", "spill disk"]
    assert report["ok"] is False
    assert [c["name"] for c in report["checks"] if not c["ok"]] == ["cluster"]


def test_the_command_exits_1_with_one_line_per_check(tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    proc = run_cli("doctor", "--lake", lake, "--address", "127.0.0.1:1", check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "credentials"],
        ["ok", "lake"],
        ["PROBLEM", "cluster"],
        ["skipped", "gpus"],
        ["skipped", "tensorflow"],
        ["skipped", "spill"],
    ]
    as_json = run_cli("doctor", "--lake", lake, "--address", "127.0.0.1:1", "--json", check=False)
    assert as_json.returncode == 1
    assert len(as_json.stdout.strip().splitlines()) == 1
    assert json.loads(as_json.stdout)["ok"] is False


def test_an_s3_endpoint_where_nothing_listens_is_unreachable(
    no_aws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    check = doctor.check_lake("s3://bucket/lake")
    assert not check.ok and check.detail.startswith("s3://bucket/lake is unreachable")
    assert check.fix.startswith("start the S3 server or fix AWS_ENDPOINT_URL")


def _probe_row(node: str, ray_gpus: float, tf_gpus: int | None, cuda: bool = True,
               error: str | None = None) -> dict:
    return {"node_id": node * 4, "node": node, "ray_gpus": ray_gpus, "tf_gpus": tf_gpus,
            "cuda_build": cuda, "error": error}


def test_tensorflow_seeing_what_ray_schedules_passes() -> None:
    check = doctor.tensorflow_gpu_check([_probe_row("10.0.0.1", 2, 2),
                                         _probe_row("10.0.0.2", 0, 0)])
    assert check.ok and check.detail.startswith("TensorFlow sees 2 GPU(s) on 2 node(s)")


def test_gpus_tensorflow_cannot_see_are_named_with_the_cuda_fix() -> None:
    check = doctor.tensorflow_gpu_check([_probe_row("10.0.0.1", 0, 0),
                                         _probe_row("10.0.0.2", 4, 0, cuda=False)])
    assert not check.ok
    assert "node 10.0.0.2: Ray schedules 4 GPU(s) but TensorFlow sees 0" in check.detail
    assert "without CUDA" in check.detail and "tensorflow[and-cuda]" in check.fix


def test_gpus_ray_does_not_schedule_are_named_with_the_num_gpus_fix() -> None:
    check = doctor.tensorflow_gpu_check([_probe_row("10.0.0.3", 0, 2)])
    assert not check.ok and "ray start --num-gpus 2" in check.fix


def test_a_node_where_tensorflow_does_not_import_is_a_problem() -> None:
    check = doctor.tensorflow_gpu_check([_probe_row("n1", 0, None, None,
                                                    "ModuleNotFoundError: tensorflow")])
    assert not check.ok and "ModuleNotFoundError" in check.detail
    assert not doctor.tensorflow_gpu_check([]).ok
    assert doctor.check_tensorflow_gpus(None, None).skipped
