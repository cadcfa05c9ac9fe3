"""The DICOMweb HTTP client the stage and publish jobs share: credentials read where the job
runs, every request with a timeout, transient failures retried with bounded backoff.

Credentials come from the spec's ``auth_file`` (a path; the file must be mode 0600 and is read
on the node that makes the request) or, without one, from ``MEDRAY_DICOMWEB_AUTH`` in that
node's own environment (set where the Ray nodes start, like the AWS credential chain). Neither
the value nor the file's content ever travels in a job submission: ``env.PASS_TO_JOBS`` does
not carry the variable, and the spec carries only the path. Error messages name the HTTP status
and the kind of request, never the URL (it holds original UIDs) nor the credentials.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import stat
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from medray.cluster.infra import env
from medray.workers.dicomweb import Auth, Endpoint, parse_auth
from medray.workers.errors import ConfigError, InfraError, NotFoundError

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30.0
ATTEMPTS = 4                   # one try and three retries
BACKOFF_SECONDS = 0.5          # doubled after each failed try: 0.5, 1, 2 s
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_JSON_BYTES = 64 * 1024 * 1024


class Unreachable(InfraError):
    """The service did not answer (or answered 5xx) after every retry."""


def load_auth(auth_file: str | None) -> Auth | None:
    """The credentials of this node: the auth file (0600 only) or MEDRAY_DICOMWEB_AUTH."""
    if auth_file:
        check_auth_file(auth_file)
        with open(auth_file, encoding="utf-8") as fh:
            return parse_auth(fh.read(4096))
    value = env.get(env.DICOMWEB_AUTH)
    return parse_auth(value) if value else None


def check_auth_file(path: str) -> None:
    """ConfigError (exit 2) unless ``path`` is a regular file only its owner can read."""
    try:
        st = os.stat(path)
    except OSError:
        raise ConfigError(f"--auth-file {path}: no such file on this machine") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"--auth-file {path}: not a regular file")
    if st.st_mode & 0o077:
        raise ConfigError(f"--auth-file {path} is readable by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")


class Client:
    """Requests to one DICOMweb service (thread-safe: each request opens its own connection)."""

    def __init__(self, endpoint: Endpoint, auth: Auth | None,
                 timeout: float = TIMEOUT_SECONDS, attempts: int = ATTEMPTS) -> None:
        self.endpoint = endpoint
        self.auth = auth
        self.timeout = timeout
        self.attempts = attempts

    def __repr__(self) -> str:
        return f"Client({self.endpoint.uri})"

    def get(self, path: str, params: Sequence[tuple[str, str]] = (), accept: str = "",
            max_bytes: int = MAX_JSON_BYTES, what: str = "request") -> tuple[str, bytes]:
        """(Content-Type, body) of a GET; NotFoundError on 404, ConfigError on 401/403,
        Unreachable when every try failed; bodies over ``max_bytes`` are refused."""
        query = f"?{urllib.parse.urlencode(list(params))}" if params else ""
        return self._send("GET", f"{path}{query}", None, accept, "", max_bytes, what)

    def get_json(self, path: str, params: Sequence[tuple[str, str]] = (),
                 what: str = "QIDO-RS search") -> Any:
        _, body = self.get(path, params, "application/dicom+json", MAX_JSON_BYTES, what)
        if not body.strip():
            return []  # 204 No Content: nothing matched
        try:
            return json.loads(body)
        except ValueError:
            raise InfraError(f"the {what} answer is not JSON") from None

    def post(self, path: str, body: bytes, content_type: str,
             what: str = "STOW-RS store") -> tuple[str, bytes]:
        return self._send("POST", path, body, "application/dicom+json", content_type,
                          MAX_JSON_BYTES, what)

    # ------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, body: bytes | None, accept: str,
              content_type: str, max_bytes: int, what: str) -> tuple[str, bytes]:
        url = f"{self.endpoint.http}/{path.lstrip('/')}"
        headers = {"Accept": accept} if accept else {}
        if content_type:
            headers["Content-Type"] = content_type
        if self.auth is not None:
            headers["Authorization"] = self.auth.header()
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                delay = BACKOFF_SECONDS * 2 ** (attempt - 1)
                log.warning("%s: %s; retry %d of %d in %.1fs", what, problem, attempt,
                            self.attempts - 1, delay)
                time.sleep(delay)
            request = urllib.request.Request(url, data=body, headers=headers, method=method)  # noqa: S310 - http(s) only (parse_endpoint)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:  # noqa: S310
                    data = resp.read(max_bytes + 1)
                    if len(data) > max_bytes:
                        raise InfraError(f"the {what} answer is over {max_bytes} bytes")
                    return resp.headers.get("Content-Type", ""), data
            except urllib.error.HTTPError as exc:
                code = exc.code
                exc.close()
                if code in (401, 403):
                    raise ConfigError(f"the DICOMweb service refused the credentials ({code}) "
                                      f"for a {what}: check --auth-file or "
                                      f"{env.DICOMWEB_AUTH} on the cluster's nodes") from None
                if code == 404:
                    raise NotFoundError(f"the DICOMweb service has no such resource (404) for a "
                                        f"{what}") from None
                if code not in RETRY_STATUS:
                    raise InfraError(f"the DICOMweb service answered {code} to a {what}"
                                     ) from None
                problem = f"HTTP {code}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                problem = f"{type(reason).__name__}"
        raise Unreachable(f"the DICOMweb service did not answer a {what} after "
                          f"{self.attempts} tries ({problem})")
