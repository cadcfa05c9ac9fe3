"""The de-identification salt (issue #13): medray generates 32 random bytes into a 0600 file; a
cluster hands it to the nodes as a mounted secret file (MEDRAY_DEID_SALT_FILE), never as an
environment variable of every Ray process; a weak salt is refused, so the public salt_id and
the pseudonyms derived from it allow no offline guess."""

from __future__ import annotations

import os
import stat

import pytest
import yaml

from medray.cluster.infra import home
from medray.workers.deid import Deidentifier, check_salt
from medray.workers.errors import ConfigError
from tests.support.paths import ROOT


def test_the_generated_salt_is_32_random_bytes_in_a_0600_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDRAY_HOME", str(tmp_path))
    monkeypatch.delenv("MEDRAY_DEID_SALT", raising=False)
    monkeypatch.delenv("MEDRAY_DEID_SALT_FILE", raising=False)
    salt = home.deid_salt()
    path = tmp_path / "deid_salt"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(bytes.fromhex(salt.decode())) == 32
    check_salt(salt)
    assert home.deid_salt() == salt  # the same on every call: one patient, one key


def test_first_uses_at_once_all_salt_with_the_one_value_that_stays(tmp_path, monkeypatch):
    """Two stagings that are a home's first (threads of one driver, or two processes) each
    find no salt and generate one: every caller must end with the value that stays in the
    file, or one patient gets two keys. Each caller here generates its own value only after
    all of them found the file missing, the race at its widest."""
    import secrets
    import threading

    monkeypatch.setenv("MEDRAY_HOME", str(tmp_path))
    monkeypatch.delenv("MEDRAY_DEID_SALT", raising=False)
    monkeypatch.delenv("MEDRAY_DEID_SALT_FILE", raising=False)
    callers = 6
    all_looked = threading.Barrier(callers, timeout=30)
    token_hex = secrets.token_hex

    def generated_after_all_looked(n: int) -> str:
        all_looked.wait()
        return token_hex(n)

    monkeypatch.setattr(secrets, "token_hex", generated_after_all_looked)
    got: list[bytes] = []
    failed: list[BaseException] = []

    def first_use() -> None:
        try:
            got.append(home.deid_salt())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            failed.append(exc)

    threads = [threading.Thread(target=first_use) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failed, failed
    stays = (tmp_path / "deid_salt").read_text().strip().encode()
    assert got == [stays] * callers
    assert stat.S_IMODE(os.stat(tmp_path / "deid_salt").st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["deid_salt"]  # no temporary left


def test_a_salt_file_named_by_the_environment_wins(tmp_path, monkeypatch):
    secret = tmp_path / "mounted" / "salt"
    secret.parent.mkdir()
    secret.write_text(os.urandom(32).hex() + "\n")
    monkeypatch.setenv("MEDRAY_DEID_SALT_FILE", str(secret))
    monkeypatch.setenv("MEDRAY_DEID_SALT", "ignored-when-a-file-is-named")
    assert home.deid_salt() == secret.read_text().strip().encode()


def test_a_weak_salt_is_refused_before_anything_is_derived_from_it():
    for weak in (b"hospital", b"x" * 100, b"0123456789" * 4, bytes(16).hex().encode()):
        with pytest.raises(ConfigError, match="too weak"):
            Deidentifier(weak)


def _containers(doc: dict) -> list[dict]:
    spec = doc["spec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in
                                                   spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]], pods


def test_kuberay_mounts_the_salt_as_a_file_and_sets_no_salt_variable():
    docs = list(yaml.safe_load_all((ROOT / "configs/cluster/kuberay/raycluster.yaml")
                                   .read_text()))
    cluster = next(d for d in docs if d and d.get("kind") == "RayCluster")
    containers, pods = _containers(cluster)
    assert len(containers) >= 3
    for container in containers:
        env = {e["name"]: e for e in container.get("env", [])}
        assert "MEDRAY_DEID_SALT" not in env, container["name"]
        assert env["MEDRAY_DEID_SALT_FILE"]["value"] == "/etc/medray/deid-salt/salt"
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["deid-salt"]["mountPath"] == "/etc/medray/deid-salt"
        assert mounts["deid-salt"]["readOnly"] is True
    for pod in pods:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["deid-salt"]["secret"]["secretName"] == "medray-deid-salt"


def test_aws_names_the_synced_salt_file_and_exports_no_salt():
    text = (ROOT / "configs/cluster/aws.yaml").read_text()
    config = yaml.safe_load(text)
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert "MEDRAY_DEID_SALT=" not in commands
    assert commands.count("MEDRAY_DEID_SALT_FILE=/home/ray/.medray-secrets/deid_salt") == 2
