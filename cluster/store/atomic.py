"""Conditional writes on the lake: create-if-absent, replace-if-unchanged, delete-if-unchanged.

Leases, version claims and commit markers need a write that fails when someone else got there
first; a plain PUT or rename silently replaces. Each primitive below is atomic on its own:

- **S3** (AWS and the embedded SeaweedFS): ``PUT`` with ``If-None-Match: *`` (create) and
  ``If-Match: <etag>`` (replace), ``DELETE`` with ``If-Match`` (delete); the server answers
  412 when the condition fails. pyarrow's S3 filesystem cannot send these headers, so a boto3
  client built from the lake's own ``s3_settings()`` makes these calls and nothing else.
- **A local disk**: create writes a temporary, fsyncs it and ``os.link``s it to the target,
  which fails when the target exists; replace and delete hold an ``fcntl`` lock on a sidecar
  file, compare the current content's SHA-256 with the expected token, and rename (after an
  fsync) or unlink; the folder is fsynced after every change.

A token is the object's ETag on S3 and its content's SHA-256 on a local disk. A write whose
reply was lost (a timeout after the server applied it) is retried; when the retry then meets
its own bytes, it counts as done. So on both backends a conditional write that finds exactly
the bytes it meant to write succeeds, and callers put something unique (an owner and a nonce)
in what they write.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from medray.cluster.store.lake import (
    Lake,
    S3Settings,
    fsync_path,
    json_bytes,
    retry_seconds,
    s3_settings,
)
from medray.workers.errors import InfraError, PermanentStorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
_LOCK_SUFFIX = ".lock"
_PERMANENT_CODES = {"AccessDenied", "NoSuchBucket", "InvalidAccessKeyId",
                    "SignatureDoesNotMatch", "NotImplemented"}


@dataclass(frozen=True)
class Versioned:
    """An object's bytes and the token a conditional replace or delete must present."""

    data: bytes
    token: str


# ------------------------------------------------------------------ the four primitives
def create_if_absent(lake: Lake, rel: str, data: bytes) -> bool:
    """Write ``rel`` only if no object is there; False when one already is."""
    return create_with_token(lake, rel, data) is not None


def create_with_token(lake: Lake, rel: str, data: bytes) -> str | None:
    """:func:`create_if_absent` that returns the new object's token (None: it existed)."""
    if lake.is_local:
        return _digest(data) if _local_create(lake, rel, data) else None
    lake.check_bucket(f"create {lake.full_uri(rel)}")
    bucket, key = _bucket_key(lake, rel)

    def put() -> str:
        resp = _client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        return str(resp["ETag"])

    return _s3_conditional(lake, rel, data, put, f"create {lake.full_uri(rel)}")


def read_with_token(lake: Lake, rel: str) -> Versioned | None:
    """The object's bytes and token; None when it does not exist."""
    if lake.is_local:
        try:
            with open(lake.path(rel), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            return None
        return Versioned(data, _digest(data))
    bucket, key = _bucket_key(lake, rel)

    def get() -> Versioned | None:
        try:
            resp = _client().get_object(Bucket=bucket, Key=key)
        except _client().exceptions.NoSuchKey:
            return None
        return Versioned(resp["Body"].read(), str(resp["ETag"]))

    return _s3_call(get, f"read {lake.full_uri(rel)}")


def replace_if_match(lake: Lake, rel: str, data: bytes, expected_token: str) -> str | None:
    """Replace ``rel`` with ``data`` only if its token is still ``expected_token``; the new
    token, or None when the object changed or is gone."""
    if lake.is_local:
        return _local_replace(lake, rel, data, expected_token)
    bucket, key = _bucket_key(lake, rel)

    def put() -> str:
        resp = _client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=expected_token)
        return str(resp["ETag"])

    return _s3_conditional(lake, rel, data, put, f"replace {lake.full_uri(rel)}")


def delete_if_match(lake: Lake, rel: str, expected_token: str) -> bool:
    """Delete ``rel`` only if its token is still ``expected_token``; False otherwise."""
    if lake.is_local:
        path = lake.path(rel)
        with _locked(path):
            current = read_with_token(lake, rel)
            if current is None or current.token != expected_token:
                return False
            os.unlink(path)
            fsync_path(os.path.dirname(path))
            return True
    bucket, key = _bucket_key(lake, rel)

    def delete() -> bool:
        _client().delete_object(Bucket=bucket, Key=key, IfMatch=expected_token)
        return True

    try:
        return bool(_s3_call(delete, f"delete {lake.full_uri(rel)}", conditional=True))
    except _Precondition:
        return False


# ------------------------------------------------------------------ numbered versions
def claim_next(lake: Lake, existing: list[int], claim_rel: Callable[[int], str],
               doc: dict[str, Any], attempts: int = 1000) -> int:
    """Claim the first free version after ``existing``'s highest by creating its claim object
    (``claim_rel(version)``) only if absent: concurrent claimers get distinct versions."""
    version = (max(existing) + 1) if existing else 1
    nonce = uuid.uuid4().hex  # makes a retried create recognise its own bytes
    for _ in range(attempts):
        body = json_bytes({**doc, "version": version, "claim": nonce})
        if create_if_absent(lake, claim_rel(version), body):
            return version
        version += 1
    raise InfraError(f"could not claim a version under {lake.full_uri(claim_rel(version))} "
                     f"after {attempts} tries: too many concurrent writers; try again")


# ------------------------------------------------------------------ local disk
def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_beside(lake: Lake, target: str) -> str:
    folder, name = target.rsplit("/", 1)
    return f"{folder}/{lake.tmp_prefix()}{uuid.uuid4().hex[:12]}-{name}"


def _local_create(lake: Lake, rel: str, data: bytes) -> bool:
    target = lake.path(rel)
    folder = target.rsplit("/", 1)[0]
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = _tmp_beside(lake, target)
    try:
        _write_synced(tmp, data)
        try:
            os.link(tmp, target)  # atomic, and fails when the target exists
        except FileExistsError:
            current = read_with_token(lake, rel)
            return current is not None and current.data == data  # as on S3 (module doc)
        fsync_path(folder)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def _locked(target: str) -> Iterator[None]:
    """An exclusive fcntl lock on ``.<name>.lock`` beside ``target`` (kept: removing it would
    let two lockers hold locks on two different files)."""
    folder, name = target.rsplit("/", 1)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(f"{folder}/.{name}{_LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _local_replace(lake: Lake, rel: str, data: bytes, expected_token: str) -> str | None:
    target = lake.path(rel)
    with _locked(target):
        current = read_with_token(lake, rel)
        if current is None or current.token != expected_token:
            return None
        tmp = _tmp_beside(lake, target)
        try:
            _write_synced(tmp, data)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        fsync_path(target.rsplit("/", 1)[0])
    return _digest(data)


# ------------------------------------------------------------------ S3
class _Precondition(Exception):
    """The server refused a conditional request (412, or 404 for If-Match on a gone key)."""


@functools.lru_cache(maxsize=8)
def _client_for(settings: S3Settings) -> Any:
    import boto3  # type: ignore[import-untyped]  # no stubs installed
    from botocore.config import Config  # type: ignore[import-untyped]

    config = Config(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=5,
                    read_timeout=60)
    kwargs: dict[str, Any] = {"region_name": settings.region, "config": config}
    if settings.endpoint:
        kwargs["endpoint_url"] = settings.endpoint
    if settings.access_key and settings.secret_key:
        kwargs["aws_access_key_id"] = settings.access_key
        kwargs["aws_secret_access_key"] = settings.secret_key
    return boto3.session.Session().client("s3", **kwargs)


def _client() -> Any:
    return _client_for(s3_settings())


def _bucket_key(lake: Lake, rel: str) -> tuple[str, str]:
    bucket, _, key = lake.path(rel).partition("/")
    return bucket, key


def _s3_call(op: Callable[[], T], what: str, conditional: bool = False) -> T:
    """Run one boto3 call: 412 (and 404 on a conditional call) raise ``_Precondition``; 409
    (a concurrent conditional write in flight, AWS) and lost connections are retried for
    ``MEDRAY_STORAGE_RETRY_SECONDS``; permanent refusals fail fast with the fix."""
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

    deadline = time.monotonic() + retry_seconds()
    delay = 0.2
    while True:
        try:
            return op()
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status == 412 or code == "PreconditionFailed" or (
                    conditional and (status == 404 or code in ("NoSuchKey", "NotFound"))):
                raise _Precondition(code) from exc
            if code in _PERMANENT_CODES or status in (401, 403):
                raise PermanentStorageError(
                    f"{what}: {code or status}: check the lake URI and that the credentials "
                    "may read and write this bucket (conditional writes need s3:PutObject "
                    "and s3:DeleteObject)") from exc
            if status not in (409, 429, 500, 502, 503, 504) or time.monotonic() > deadline:
                raise InfraError(f"{what}: {code or status}: {err.get('Message', exc)}") from exc
        except BotoCoreError as exc:  # connection refused, timeouts
            if time.monotonic() > deadline:
                raise InfraError(f"{what}: storage unreachable: {exc}") from exc
        log.warning("%s: transient storage error, retrying", what)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _s3_conditional(lake: Lake, rel: str, data: bytes, put: Callable[[], str],
                    what: str) -> str | None:
    """A conditional PUT: its result, or None when the condition failed. A 412 that meets
    our own bytes means an earlier try of this same write landed (its reply was lost)."""
    try:
        return _s3_call(put, what, conditional=True)
    except _Precondition:
        current = read_with_token(lake, rel)
        if current is not None and current.data == data:
            log.info("%s: an earlier try of this write had landed", what)
            return current.token
        return None
