"""A lease per run id: one job at a time may write a run, and a dead job's run can be resumed.

``runs/<run_id>/_LEASE.json`` names the job that owns the run (``owner``, its Ray submission
id), the attempt (a nonce, new each time a job takes the lease) and its last heartbeat. The
CLI takes it for the job id it is about to submit, before submitting; the job adopts it (or
takes it when absent), renews it every ``HEARTBEAT_S`` from a daemon thread and checks it
before every file it writes and at the commit.

Every change is a conditional write (``atomic``): the first claim is a create-if-absent, a
heartbeat or a takeover a replace-if-unchanged, so of two takers exactly one wins. A lease
held by another job is taken over only when that job is dead: Ray's Jobs API says it ended
(SUCCEEDED, FAILED, STOPPED), or Ray does not know it and its heartbeat is older than the TTL
(a job of another cluster sharing the lake, or a CLI killed between claim and submission). A
job whose own heartbeat could not be renewed for a TTL stops writing: by then another attempt
may own the run.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from medray.cluster.store import atomic, layout
from medray.cluster.store.lake import Lake, json_bytes
from medray.workers.errors import ConfigError, InfraError, MedrayError

log = logging.getLogger(__name__)

TTL_S = 60.0  # a heartbeat older than this, of a job Ray does not know, is a dead job's
HEARTBEAT_S = 10.0
ENDED = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Ray's status of a job id ("RUNNING", "STOPPED"...), or None when Ray does not know the job
Liveness = Callable[[str], str | None]


class LeaseLostError(MedrayError):
    """Another attempt owns the run now (or this one could not renew its lease for a TTL):
    this attempt must write nothing more."""


@dataclass(frozen=True)
class Holder:
    """A lease as read from the lake, with the token a conditional replace must present."""

    doc: dict[str, Any]
    token: str

    @property
    def owner(self) -> str:
        return str(self.doc.get("owner", ""))

    def age_s(self) -> float:
        """Seconds since the holder's last heartbeat (by this machine's clock)."""
        beat = datetime.fromisoformat(str(self.doc["heartbeat_at"]))
        return max(0.0, (datetime.now(UTC) - beat).total_seconds())


def read(lake: Lake, run_id: str) -> Holder | None:
    found = atomic.read_with_token(lake, layout.run_lease(run_id))
    return Holder(json.loads(found.data), found.token) if found else None


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _ask(holder: Holder, liveness: Liveness) -> str | None:
    """Ray's status of the holder's job. A Jobs API that cannot answer is not a "does not
    know": nothing is taken over then."""
    try:
        return liveness(holder.owner)
    except Exception as exc:  # noqa: BLE001 - any failure to ask: refuse, never guess
        raise InfraError(f"job {holder.owner} holds the run's lease and Ray cannot be asked "
                         f"whether it still runs ({type(exc).__name__}: {exc}); check the "
                         "cluster (`medray cluster status`) and try again") from exc


def dead_reason(holder: Holder, status: str | None, ttl_s: float = TTL_S) -> str | None:
    """Why the holder's job is dead (so its lease may be taken over), or None if it may live;
    ``status`` is Ray's (None: Ray does not know the job)."""
    if status in ENDED:
        return f"Ray says job {holder.owner} {status}"
    age = holder.age_s()
    if status is None and age > ttl_s:
        return f"Ray does not know job {holder.owner} and its last heartbeat is {age:.0f}s old"
    return None


def _held_message(run_id: str, holder: Holder, status: str | None, ttl_s: float) -> str:
    owner = holder.owner
    state = status.lower() if status else (
        f"not known to this cluster; its lease expires {max(0, ttl_s - holder.age_s()):.0f}s "
        "after its last heartbeat")
    return (f"run {run_id!r} is being written by job {owner} ({state}): wait for it to end "
            f"(`medray jobs status {owner}`), or stop it (`medray jobs stop {owner}`) and "
            "submit this command again to resume the run")


def acquire(lake: Lake, run_id: str, owner: str, liveness: Liveness, *, by: str,
            ttl_s: float = TTL_S) -> Lease:
    """Take the run's lease for job ``owner``: create it when absent, adopt it when ``owner``
    already holds it (the CLI claimed it for this job), or take it over from a dead job.
    Raises ConfigError (exit 2) naming the live job that holds it."""
    for _ in range(8):
        holder = read(lake, run_id)
        replaced: list[dict[str, Any]] = list(holder.doc.get("replaced", [])) if holder else []
        if holder is not None and holder.owner != owner:
            status = _ask(holder, liveness)
            why = dead_reason(holder, status, ttl_s)
            if why is None:
                raise ConfigError(_held_message(run_id, holder, status, ttl_s))
            replaced.append({"owner": holder.owner, "attempt": holder.doc.get("attempt"),
                             "why": why, "at": _now()})
        doc = {"run_id": run_id, "owner": owner, "attempt": uuid.uuid4().hex[:16],
               "claimed_at": _now(), "claimed_by": by, "host": socket.gethostname(),
               "heartbeat_at": _now(), "ttl_s": ttl_s, "replaced": replaced}
        rel = layout.run_lease(run_id)
        if holder is None:
            token = atomic.create_with_token(lake, rel, json_bytes(doc))
            if token is not None:
                return Lease(lake, run_id, doc, token, ttl_s)
        else:
            token = atomic.replace_if_match(lake, rel, json_bytes(doc), holder.token)
            if token is not None:
                if holder.owner != owner:
                    log.warning("run %s: took the lease over from job %s (%s)", run_id,
                                holder.owner, replaced[-1]["why"])
                return Lease(lake, run_id, doc, token, ttl_s)
        log.info("run %s: the lease changed while taking it; looking again", run_id)
    raise InfraError(f"run {run_id!r}: could not take its lease: it keeps changing; try again")


class Lease:
    """A lease this process holds: renew it, check it before writing, release it."""

    def __init__(self, lake: Lake, run_id: str, doc: dict[str, Any], token: str,
                 ttl_s: float = TTL_S) -> None:
        self.lake, self.run_id, self.doc, self.ttl_s = lake, run_id, doc, ttl_s
        self._token = token
        self._lock = threading.Lock()
        self._renewed = time.monotonic()
        self._lost: str | None = None

    @property
    def owner(self) -> str:
        return str(self.doc["owner"])

    @property
    def attempt(self) -> str:
        return str(self.doc["attempt"])

    def replaced_owners(self) -> list[str]:
        """The jobs whose lease this one replaced (all dead when replaced)."""
        return [str(r["owner"]) for r in self.doc.get("replaced", [])]

    def heartbeat(self) -> bool:
        """Renew the heartbeat; False (and the lease is lost) when someone else changed it."""
        with self._lock:
            if self._lost:
                return False
            doc = {**self.doc, "heartbeat_at": _now()}
            token = atomic.replace_if_match(self.lake, layout.run_lease(self.run_id),
                                            json_bytes(doc), self._token)
            if token is None:
                holder = read(self.lake, self.run_id)
                self._lost = (f"job {holder.owner} took it over" if holder
                              else "its lease was deleted")
                log.error("run %s: lease lost: %s", self.run_id, self._lost)
                return False
            self.doc, self._token, self._renewed = doc, token, time.monotonic()
            return True

    def check(self) -> None:
        """Raise LeaseLostError unless this attempt still owns the run: call before every
        write and at the commit."""
        with self._lock:
            stale = time.monotonic() - self._renewed
            if not self._lost and stale > self.ttl_s - HEARTBEAT_S:
                self._lost = f"its heartbeat could not be renewed for {stale:.0f}s"
            if not self._lost:
                holder = read(self.lake, self.run_id)
                if holder is None:
                    self._lost = "its lease was deleted"
                elif (holder.owner, holder.doc.get("attempt")) != (self.owner, self.attempt):
                    self._lost = f"job {holder.owner} took it over"
            if self._lost:
                raise LeaseLostError(
                    f"run {self.run_id!r}: job {self.owner} no longer owns the run "
                    f"({self._lost}); it stops here and writes nothing more")

    def release(self) -> bool:
        """Delete the lease if it is still this one's (after the commit, or when the job this
        CLI claimed it for could not be submitted)."""
        with self._lock:
            self._lost = self._lost or "released"
            return atomic.delete_if_match(self.lake, layout.run_lease(self.run_id), self._token)


class Keeper:
    """A daemon thread that renews a lease every ``every`` seconds and runs ``chores`` (each
    ``(period_s, fn)``) on their own periods; a chore's failure is logged, never raised."""

    def __init__(self, lease: Lease, every: float = HEARTBEAT_S,
                 chores: tuple[tuple[float, Callable[[], None]], ...] = ()) -> None:
        self.lease, self.every, self.chores = lease, every, chores
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{lease.run_id}",
                                        daemon=True)

    def __enter__(self) -> Keeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop renewing (waits a few seconds at most: the thread is a daemon)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        due = [time.monotonic()] * len(self.chores)  # each chore runs at once, then per period
        while True:
            for i, (period, fn) in enumerate(self.chores):
                if time.monotonic() >= due[i] and not self._stop.is_set():
                    due[i] = time.monotonic() + period
                    try:
                        fn()
                    except Exception as exc:  # noqa: BLE001 - a chore never stops the lease
                        log.warning("run %s: %s failed: %s", self.lease.run_id,
                                    getattr(fn, "__name__", "a chore"), exc)
            if self._stop.wait(self.every):
                return
            try:
                if not self.lease.heartbeat():
                    return  # lost: the job's next check raises
            except Exception as exc:  # noqa: BLE001 - retried next tick; check() fences
                log.warning("run %s: lease heartbeat failed, retrying: %s",
                            self.lease.run_id, exc)
