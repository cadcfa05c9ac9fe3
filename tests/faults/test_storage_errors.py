"""Storage errors: transient ones (the endpoint refuses connections for a while, the server is
frozen) are retried with backoff until they pass; permanent ones (a wrong secret, an unknown
access key) fail fast with a message that names the fix, and never echo the secret."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid

import pytest

from medray.cluster.infra import s3server
from medray.cluster.store import lake as lake_mod
from medray.workers.errors import InfraError, PermanentStorageError
from tests.support import faults as h

pytestmark = [pytest.mark.integration]


class FlakyProxy:
    """A loopback TCP forwarder to the S3 server that can refuse connections for a while
    (its listening socket is closed, so clients get 'connection refused')."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.accepted = 0

    def up(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(16)
        sock.settimeout(0.2)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def down(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def close(self) -> None:
        self._stop.set()
        self.down()

    def _accept(self, sock: socket.socket) -> None:
        while not self._stop.is_set() and self._listener is sock:
            try:
                client, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            upstream = socket.create_connection(self.target, timeout=10)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def env_credentials(s3_server, medray_home, monkeypatch):
    """Point the lake at an explicit endpoint + key pair (the AWS-style path of s3_settings)."""
    _, creds = h.lake_config(medray_home)

    def use(endpoint: str, access_key: str | None = None, secret_key: str | None = None) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key or creds["access_key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key or creds["secret_key"])

    return use


def test_connection_refused_for_seconds_is_retried(s3_server, env_credentials, monkeypatch,
                                                   caplog):
    host, port = s3_server["endpoint"].split("//", 1)[1].rsplit(":", 1)
    proxy = FlakyProxy((host, int(port)))
    env_credentials(f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("MEDRAY_STORAGE_RETRY_SECONDS", "30")
    lake = lake_mod.Lake(f"s3://{s3_server['bucket']}/flaky-{uuid.uuid4().hex[:6]}")
    timer = threading.Timer(3.0, proxy.up)  # refused for 3 s, then the endpoint is back
    try:
        timer.start()
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="medray.cluster.store.lake"):
            lake.write_bytes("probe.bin", b"payload")
            data = lake.read_bytes("probe.bin")
        elapsed = time.monotonic() - started
    finally:
        timer.cancel()
        proxy.close()
    assert data == b"payload"
    assert elapsed >= 2.5 and proxy.accepted > 0
    assert any("transient storage error" in r.getMessage() for r in caplog.records)


def test_unreachable_storage_gives_up_after_the_retry_budget(s3_server, env_credentials,
                                                             monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    env_credentials(f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("MEDRAY_STORAGE_RETRY_SECONDS", "3")
    lake = lake_mod.Lake(f"s3://{s3_server['bucket']}/dead")
    started = time.monotonic()
    with pytest.raises(InfraError, match="storage unreachable after") as info:
        lake.read_bytes("anything.json")
    assert 2.5 <= time.monotonic() - started < 15
    assert info.value.retryable


def test_frozen_server_delays_but_does_not_fail_a_read(s3_server, medray_home):
    lake = lake_mod.Lake(f"s3://{s3_server['bucket']}/frozen-{uuid.uuid4().hex[:6]}")
    lake.write_bytes("x.bin", b"before")
    pause = threading.Thread(target=s3server.pause_for, args=(4,))
    pause.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        assert lake.read_bytes("x.bin") == b"before"
        assert time.monotonic() - started >= 2
    finally:
        pause.join(timeout=30)


def _fast_cli_failure(args: list[str], env: dict) -> tuple[str, float]:
    """A storage refusal ends the command with PermanentStorageError's code: 1 (medray's
    errors carry their exit codes: 2 is bad input or config that medray itself can judge)."""
    started = time.monotonic()
    proc = h.cli(None, *args, check=False, env=env, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == PermanentStorageError.exit_code == 1, proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc.stderr, elapsed


def test_wrong_secret_key_fails_fast_and_names_the_fix(s3_server, medray_home):
    _, creds = h.lake_config(medray_home)
    wrong = "W" + uuid.uuid4().hex
    env = {"AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_ACCESS_KEY_ID": creds["access_key"],
           "AWS_SECRET_ACCESS_KEY": wrong, "MEDRAY_STORAGE_RETRY_SECONDS": "60"}
    err, elapsed = _fast_cli_failure(
        ["datasets", "list", "--lake", f"s3://{s3_server['bucket']}/any"], env)
    assert elapsed < 10, f"a permanent error took {elapsed:.1f}s"
    assert "SIGNATURE_DOES_NOT_MATCH" in err and "secret key is wrong" in err, err
    assert wrong not in err and creds["secret_key"] not in err


def test_unknown_access_key_fails_fast_and_names_the_fix(s3_server, medray_home):
    env = {"AWS_ENDPOINT_URL": s3_server["endpoint"], "AWS_ACCESS_KEY_ID": "NOSUCHKEY123",
           "AWS_SECRET_ACCESS_KEY": "whatever", "MEDRAY_STORAGE_RETRY_SECONDS": "60"}
    err, elapsed = _fast_cli_failure(
        ["models", "list", "--lake", f"s3://{s3_server['bucket']}/any"], env)
    assert elapsed < 10
    assert "ACCESS_DENIED" in err or "INVALID_ACCESS_KEY_ID" in err, err
    assert "credentials" in err or "access key" in err


def test_missing_bucket_read_fails_fast_with_exit_2(s3_server):
    lake = f"s3://nobucket-{uuid.uuid4().hex[:8]}/lake"
    started = time.monotonic()
    proc = h.cli(None, "score", "--dataset", "pneu", "--model", "m", "--lake", lake,
                 check=False, timeout=60)
    assert proc.returncode == 2 and time.monotonic() - started < 10, proc.stderr[-1000:]
    assert "no dataset 'pneu'" in proc.stderr and "medray stage" in proc.stderr


def test_write_to_missing_bucket_is_refused(s3_server, medray_home):
    bucket = f"typo-{uuid.uuid4().hex[:8]}"
    lake = lake_mod.Lake(f"s3://{bucket}/lake")
    try:
        with pytest.raises(PermanentStorageError, match="NO_SUCH_BUCKET"):
            lake.write_json("datasets/x/1/manifest.json", {})
        # nothing was written, so the server did not make the typo a new bucket
        assert h.s3fs(medray_home).get_file_info(bucket).type == h.pafs.FileType.NotFound
    finally:
        fs = h.s3fs(medray_home, allow_bucket_deletion=True)
        if fs.get_file_info(bucket).type != h.pafs.FileType.NotFound:
            fs.delete_dir(bucket)

