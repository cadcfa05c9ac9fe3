"""The crash guard of the stage decoders: an input that kills the decoding process (a decoder
segfault, an OOM kill) becomes an errors row instead of an endless retry loop. Ray restarts a
dead actor under the same id (a bounded number of times: ``pipeline.retry_bounds``) and the
new incarnation skips the input its predecessor died on.
"""

from __future__ import annotations

import json
import logging
import os

from medray.cluster.infra import faults

log = logging.getLogger(__name__)


class CrashGuard:
    """Turns an input that kills the decoding process (a decoder segfault, an OOM kill) into an
    error row instead of an endless retry loop.

    Before each decode the actor notes the input in a small per-actor file; Ray restarts a dead
    actor under the same id and retries its batch, and the new incarnation finds the note and
    skips that input. ``MEDRAY_FAULT=stage_crash_on:TEXT`` kills the process on inputs whose
    URI contains TEXT (once), to test this.
    """

    def __init__(self, folder: str | None) -> None:
        self.fd: int | None = None
        self.bad: set[str] = set()
        self.fault = faults.stage_crash_text()
        if not folder:
            return
        import ray

        # outside Ray (unit tests) there is no actor to guard; asking would start a Ray
        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        if not actor:
            return
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, f"{actor}.current")
        bad_list = os.path.join(folder, f"{actor}.bad")  # every poison seen, across restarts
        if os.path.exists(path):
            with open(path, "rb") as fh:
                note = fh.read()
            size = int.from_bytes(note[:4], "little") if len(note) >= 4 else 0
            last = note[4:4 + size].decode(errors="replace")
            if last:
                # the input is not named: source paths may carry identities (docs/staging.md)
                log.warning("a previous worker died while decoding an input; skipping it")
                with open(bad_list, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(last) + "\n")  # JSON: a name may hold a newline
        if os.path.exists(bad_list):
            with open(bad_list, encoding="utf-8") as fh:
                self.bad = {json.loads(line) for line in fh if line.strip()}
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def poisoned(self, uri: str) -> bool:
        return uri in self.bad

    def enter(self, uri: str) -> None:
        if self.fd is not None:  # one syscall per image: a length-prefixed note at offset 0
            data = uri.encode()
            os.pwrite(self.fd, len(data).to_bytes(4, "little") + data, 0)
        if self.fault and self.fault in uri and self.fd is not None:
            faults.die()  # fault injection: see the class docstring

    def clear(self) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, b"\0\0\0\0", 0)
