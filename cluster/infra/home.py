"""MEDRAY_HOME: where the local cluster, the embedded lake and their secrets live."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from medray.cluster.infra import env


def medray_home() -> Path:
    home = Path(env.get(env.HOME) or Path.home() / ".medray").expanduser()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read; created 0600 before any byte lands in it. Among
    concurrent writers the last one's text stays (each writes a temporary of its own)."""
    os.replace(_private_temporary(path, text), path)


def create_private_once(path: Path, text: str) -> str:
    """Create ``path`` (0600) holding ``text`` unless it exists, and return what it holds: a
    secret generated on first use (the de-identification salt, the cluster's token, the
    embedded lake's keys) must be one value for every caller. Concurrent first uses, threads or
    processes, each write a temporary of their own and hard-link it to ``path``; a link never
    replaces a file, so the first one stays and every caller reads it."""
    if not path.exists():
        tmp = _private_temporary(path, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another caller created it first: theirs is the value
        finally:
            tmp.unlink()
    return path.read_text()


def _private_temporary(path: Path, text: str) -> Path:
    """``text`` in a new 0600 file beside ``path``, under a name no other writer uses, synced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)  # whatever the umask left of the mode
    return tmp


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def deid_salt() -> bytes:
    """The salt for patient keys, UID remapping, date shifts and path pseudonyms.

    From the file MEDRAY_DEID_SALT_FILE names (on the AWS and KubeRay configs a secret mounted
    on every node, docs/cloud.md), else MEDRAY_DEID_SALT, else ``MEDRAY_HOME/deid_salt``,
    generated on first use: 32 random bytes (as hex), a 0600 file. It must stay the same across
    staging jobs so a patient keeps one key (a secret: never logged or written to the lake).
    """
    from_file = env.get(env.DEID_SALT_FILE)
    if from_file:
        return Path(from_file).read_text().strip().encode()
    given = env.get(env.DEID_SALT)
    if given:
        return given.encode()
    path = medray_home() / "deid_salt"
    if not path.exists():
        import secrets

        # two first stagings at once must not salt with two values: one patient, one key
        return create_private_once(path, secrets.token_hex(32)).strip().encode()
    return path.read_text().strip().encode()
