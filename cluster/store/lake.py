"""The lake: one URI (a local path, ``file://...`` or ``s3://bucket/prefix``) behind one API.

Writes are atomic per object: local files are written beside their target, fsynced, renamed,
and their folder fsynced, so a rename that survived an OS crash names complete bytes; an S3
PUT (single or multipart) becomes visible only when it completes. Commit points (manifests,
model cards, run markers) are therefore single objects written last. Conditional writes
(create-if-absent and friends, for leases and claims) are in ``atomic.py``.

S3 endpoint and credentials come from, in order: ``AWS_ENDPOINT_URL`` and the standard AWS
credential chain; else the embedded lake's config under ``MEDRAY_HOME`` (written by
``medray lake up``). Secrets are never passed through job submission or written to the lake.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from medray.cluster.infra import env
from medray.cluster.infra.home import medray_home, read_json
from medray.workers.errors import ConfigError, InfraError, NotFoundError, PermanentStorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
TMP_PREFIX = ".tmp-"  # how a local temporary's name starts (a reader skips such names)

_PERMANENT = {
    "ACCESS_DENIED": "check that the credentials may read and write this bucket",
    "NO_SUCH_BUCKET": "create the bucket or fix the lake URI (--lake / MEDRAY_LAKE)",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key is wrong: check AWS_SECRET_ACCESS_KEY or "
    "MEDRAY_HOME's lake credentials",
    "INVALID_ACCESS_KEY_ID": "the access key is unknown to this S3 endpoint",
}
_TRANSIENT = (
    "connection refused",
    "couldn't connect",
    "could not connect",
    "network_connection",
    "timed out",
    "timeout",
    "slow_down",
    "service_unavailable",
    "internal_failure",
    "connection reset",
    "broken pipe",
    "curl error",
    "error code 7",
    "503",
    "500",
)


def retry_seconds() -> float:
    return float(env.get(env.STORAGE_RETRY_SECONDS, "60"))


def classify(exc: BaseException) -> str:
    """'permanent', 'transient' or 'other' for an error raised by the storage layer."""
    text = str(exc)
    upper = text.upper()
    if any(code in upper for code in _PERMANENT):
        return "permanent"
    lower = text.lower()
    if any(marker in lower for marker in _TRANSIENT):
        return "transient"
    return "other"


# listings of a local folder that raced another writer (Lake._listing)
_LISTING_TRIES = 5


def with_retries(op: Callable[[], T], what: str, deadline_s: float | None = None) -> T:
    """Run one storage operation, retrying transient failures with jittered backoff."""
    deadline = time.monotonic() + (retry_seconds() if deadline_s is None else deadline_s)
    delay = 0.2
    attempt = 0
    while True:
        attempt += 1
        try:
            return op()
        except (FileNotFoundError, NotFoundError):
            raise
        except OSError as exc:
            kind = classify(exc)
            if kind == "permanent":
                code = next(c for c in _PERMANENT if c in str(exc).upper())
                raise PermanentStorageError(f"{what}: {code}: {_PERMANENT[code]}") from exc
            if kind != "transient" or time.monotonic() + delay > deadline:
                if kind == "transient":
                    raise InfraError(
                        f"{what}: storage unreachable after {attempt} attempts: {exc}"
                    ) from exc
                raise
            log.warning(
                "%s: transient storage error (attempt %d), retrying: %s", what, attempt, exc
            )
            time.sleep(delay * (1 + random.random() / 2))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 5.0)


@dataclass(frozen=True)
class S3Settings:
    endpoint: str | None
    region: str
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)


def embedded_lake_config() -> dict[str, Any] | None:
    return read_json(medray_home() / "lake" / "lake.json")


def s3_settings() -> S3Settings:
    endpoint = env.get(env.AWS_ENDPOINT_URL_S3) or env.get(env.AWS_ENDPOINT_URL) or None
    region = env.get(env.AWS_REGION) or env.get(env.AWS_DEFAULT_REGION, "us-east-1")
    if endpoint or env.get(env.AWS_ACCESS_KEY_ID):
        return S3Settings(endpoint=endpoint, region=region)
    cfg = embedded_lake_config()
    if cfg:
        creds = read_json(Path(cfg["credentials_file"])) or {}
        return S3Settings(
            endpoint=cfg["endpoint"],
            region=region,
            access_key=creds.get("access_key"),
            secret_key=creds.get("secret_key"),
        )
    return S3Settings(endpoint=None, region=region)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {
        "region": settings.region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        "connect_timeout": 5,
        "request_timeout": 60,
    }
    if settings.endpoint:
        parsed = urlparse(settings.endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "http"
    if settings.access_key and settings.secret_key:
        kwargs["access_key"] = settings.access_key
        kwargs["secret_key"] = settings.secret_key
    return pafs.S3FileSystem(**kwargs)


def default_lake_uri() -> str:
    """--lake / MEDRAY_LAKE, else the embedded S3 lake if it is up, else a local folder."""
    uri = env.get(env.LAKE)
    if uri:
        return uri
    cfg = embedded_lake_config()
    if cfg:
        return f"s3://{cfg['bucket']}/lake"
    return str(medray_home() / "lake-local")


class Lake:
    """A lake root. Paths given to methods are relative to the root, with '/' separators."""

    def __init__(self, uri: str, tmp_tag: str = "") -> None:
        if not uri:
            raise ConfigError("no lake given: pass --lake or set MEDRAY_LAKE")
        self.uri = uri.rstrip("/")
        parsed = urlparse(self.uri)
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise ConfigError(f"lake URI {uri!r} has no bucket: use s3://bucket/prefix")
            self.fs: pafs.FileSystem = _s3_filesystem(s3_settings())
            self.base = f"{parsed.netloc}{parsed.path}".rstrip("/")
            self.is_local = False
        elif parsed.scheme in ("", "file"):
            path = Path(parsed.path if parsed.scheme == "file" else self.uri).expanduser().resolve()
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.fs = pafs.LocalFileSystem()
            self.base = str(path)
            self.uri = str(path)
            self.is_local = True
        else:
            raise ConfigError(
                f"unsupported lake URI scheme {parsed.scheme!r} in {uri!r}: "
                "use a local path, file://... or s3://bucket/prefix"
            )
        self.tmp_tag = _safe_tag(tmp_tag)

    def __repr__(self) -> str:
        return f"Lake({self.uri!r})"

    def __reduce__(self) -> tuple[type[Lake], tuple[str, str]]:  # the URI only: no secrets
        return (Lake, (self.uri, self.tmp_tag))

    def tagged(self, tag: str) -> Lake:
        """The same lake, naming its local temporaries after ``tag`` (an attempt's job id), so
        a clean-up can remove its own attempt's temporaries and no other's."""
        return Lake(self.uri, tmp_tag=tag)

    def tmp_prefix(self, tag: str | None = None) -> str:
        """How a local temporary's name starts: ``.tmp-<tag>-`` (``.tmp-`` + a random part
        follows when untagged)."""
        tag = self.tmp_tag if tag is None else _safe_tag(tag)
        return f"{TMP_PREFIX}{tag}-" if tag else TMP_PREFIX

    # paths -----------------------------------------------------------------------------------
    def path(self, rel: str) -> str:
        rel = rel.strip("/")
        if ".." in rel.split("/"):
            raise ConfigError(f"refusing a lake path that leaves the lake: {rel!r}")
        return f"{self.base}/{rel}" if rel else self.base

    def full_uri(self, rel: str) -> str:
        return f"{self.uri}/{rel.strip('/')}" if rel else self.uri

    # reads -----------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        info = with_retries(lambda: self.fs.get_file_info(self.path(rel)), f"stat {rel}")
        return info.type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        def op() -> bytes:
            with self.fs.open_input_stream(self.path(rel)) as fh:
                return fh.read()

        try:
            return with_retries(op, f"read {self.full_uri(rel)}")
        except FileNotFoundError as exc:
            raise NotFoundError(f"not in the lake: {self.full_uri(rel)}") from exc

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_json_or_none(self, rel: str) -> Any:
        try:
            return self.read_json(rel)
        except NotFoundError:
            return None

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        def op() -> pa.Table:
            return pq.read_table(self.path(rel), filesystem=self.fs, columns=columns)

        try:
            return with_retries(op, f"read {self.full_uri(rel)}")
        except FileNotFoundError as exc:
            raise NotFoundError(f"not in the lake: {self.full_uri(rel)}") from exc

    def list_files(self, rel: str, recursive: bool = False) -> list[str]:
        """Relative paths of the files under ``rel`` (sorted); [] when it does not exist."""
        prefix = len(self.base) + 1
        return sorted(i.path[prefix:] for i in self._listing(rel, recursive)
                      if i.type == pafs.FileType.File)

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the folders directly under ``rel`` (sorted)."""
        return sorted(i.base_name for i in self._listing(rel, False)
                      if i.type == pafs.FileType.Directory)

    def _listing(self, rel: str, recursive: bool) -> list[pafs.FileInfo]:
        """What is under ``rel``; [] when it does not exist. pyarrow's local listing asks
        whether a folder exists only after listing it failed, so a folder another writer
        creates in between (a concurrent first claim of a dataset version) fails the listing
        with FileNotFoundError, and so does an entry removed between the listing and its stat
        (another writer's temporary). Listing again sees the folder as it now is."""
        selector = pafs.FileSelector(self.path(rel), recursive=recursive, allow_not_found=True)

        def once() -> list[pafs.FileInfo]:
            return with_retries(lambda: self.fs.get_file_info(selector), f"list {rel}")

        for _ in range(_LISTING_TRIES - 1):
            try:
                return once()
            except FileNotFoundError:
                continue
        return once()

    def size(self, rel: str) -> int:
        info = with_retries(lambda: self.fs.get_file_info(self.path(rel)), f"stat {rel}")
        if info.type == pafs.FileType.NotFound:
            raise NotFoundError(f"not in the lake: {self.full_uri(rel)}")
        return int(info.size or 0)

    # writes ----------------------------------------------------------------------------------
    def _atomic(self, rel: str, write: Callable[[str], None]) -> None:
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        if self.is_local:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            tmp = f"{parent}/{self.tmp_prefix()}{uuid.uuid4().hex[:12]}-{target.rsplit('/', 1)[1]}"
            try:
                write(tmp)
                os.chmod(tmp, 0o600)
                fsync_path(tmp)  # the bytes are on disk before the name says they are there
                os.replace(tmp, target)
                fsync_path(parent)  # and the rename itself survives an OS crash
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self.check_bucket(f"write {self.full_uri(rel)}")
            with_retries(lambda: write(target), f"write {self.full_uri(rel)}")

    _buckets_seen: ClassVar[set[tuple[str, str]]] = set()

    def check_bucket(self, what: str) -> None:
        """Refuse to write into a bucket that does not exist. Some S3 servers (SeaweedFS)
        create a bucket on the first PUT, so a typo in the lake URI would quietly start a new
        lake. Checked once per process and bucket; a HEAD the credentials may not make
        (access denied) leaves the decision to the write itself."""
        bucket = self.base.split("/", 1)[0]
        key = (str(getattr(self.fs, "endpoint_override", "") or ""), bucket)
        if key in Lake._buckets_seen:
            return
        try:
            info = with_retries(lambda: self.fs.get_file_info(bucket), what)
        except PermanentStorageError as exc:
            if "ACCESS_DENIED" not in str(exc):
                raise
            info = None
        if info is not None and info.type == pafs.FileType.NotFound:
            raise PermanentStorageError(
                f"{what}: NO_SUCH_BUCKET: bucket {bucket!r} does not exist: "
                f"{_PERMANENT['NO_SUCH_BUCKET']}"
            )
        Lake._buckets_seen.add(key)

    def write_bytes(self, rel: str, data: bytes) -> None:
        def write(path: str) -> None:
            with self.fs.open_output_stream(path) as fh:
                fh.write(data)

        self._atomic(rel, write)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json_bytes(obj))

    def write_parquet(self, rel: str, table: pa.Table, compression: str = "zstd") -> int:
        """Write one Parquet object atomically; returns its size in bytes."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression=compression)
        data = buf.getvalue()
        self.write_bytes(rel, data)
        return len(data)

    def delete(self, rel: str) -> None:
        try:
            with_retries(lambda: self.fs.delete_file(self.path(rel)), f"delete {rel}")
        except FileNotFoundError:
            pass

    def delete_dir(self, rel: str) -> None:
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            with_retries(lambda: self.fs.delete_dir(self.path(rel)), f"delete {rel}")


def _safe_tag(tag: str) -> str:
    """A job id as a file-name part: anything but [A-Za-z0-9_-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", tag)


def json_bytes(obj: Any) -> bytes:
    """How the lake stores a JSON document (sorted keys, indented)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


def fsync_path(path: str) -> None:
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def source_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for reading a staging source: a local path or s3://bucket/key."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _s3_filesystem(s3_settings()), f"{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()
        return pafs.LocalFileSystem(), str(path)
    raise ConfigError(f"unsupported source URI {uri!r}: use a local path or s3://bucket/prefix")


def source_uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path
