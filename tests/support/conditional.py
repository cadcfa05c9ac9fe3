"""The contract of the lake's conditional writes, run against any lake: the unit suite runs it
on a local folder, the integration suite on the embedded S3 server (the same checks, so the two
backends cannot drift apart).

Each ``check_*`` takes a fresh ``Lake`` and fails with an AssertionError naming the broken
promise. Concurrency is real: threads (and, for the local lake, processes) race on one key.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from medray.cluster.store import atomic, catalog, layout, leases, registry
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError
from medray.workers.models import ModelCard

RACERS = 8


def race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(0..n-1)`` in ``n`` threads released at the same instant."""
    gate = threading.Barrier(n)

    def go(i: int) -> Any:
        gate.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(go, range(n)))


def check_create_if_absent(lake: Lake) -> None:
    assert atomic.create_if_absent(lake, "c/one.json", b"first")
    assert not atomic.create_if_absent(lake, "c/one.json", b"second")
    assert lake.read_bytes("c/one.json") == b"first", "a refused create replaced the object"
    # a retried create whose first try landed (its reply lost) meets its own bytes: done
    assert atomic.create_if_absent(lake, "c/one.json", b"first")
    wins = race(RACERS, lambda i: atomic.create_if_absent(lake, "c/race.json", b"w%d" % i))
    assert sum(wins) == 1, f"{sum(wins)} of {RACERS} concurrent creates won"
    winner = wins.index(True)
    assert lake.read_bytes("c/race.json") == b"w%d" % winner


def check_replace_and_delete_if_match(lake: Lake) -> None:
    assert atomic.read_with_token(lake, "r/x.json") is None
    assert atomic.replace_if_match(lake, "r/x.json", b"v", "any-token") is None
    assert atomic.create_if_absent(lake, "r/x.json", b"v1")
    first = atomic.read_with_token(lake, "r/x.json")
    assert first is not None and first.data == b"v1"
    second = atomic.replace_if_match(lake, "r/x.json", b"v2", first.token)
    assert second is not None and second != first.token
    assert atomic.replace_if_match(lake, "r/x.json", b"v3", first.token) is None, \
        "a stale token replaced the object"
    assert lake.read_bytes("r/x.json") == b"v2"
    assert not atomic.delete_if_match(lake, "r/x.json", first.token)
    assert lake.exists("r/x.json")
    current = atomic.read_with_token(lake, "r/x.json")
    assert current is not None and current.token == second
    # racing replacers holding one token: exactly one wins
    results = race(RACERS, lambda i: atomic.replace_if_match(lake, "r/x.json", b"n%d" % i,
                                                             current.token))
    won = [i for i, t in enumerate(results) if t is not None]
    assert len(won) == 1, f"{len(won)} of {RACERS} replacers with one token won"
    assert lake.read_bytes("r/x.json") == b"n%d" % won[0]
    assert atomic.delete_if_match(lake, "r/x.json", str(results[won[0]]))
    assert not lake.exists("r/x.json")


def check_leases(lake: Lake) -> None:
    """Claim, refuse a live holder, take over from a dead one (two takers: one wins)."""
    status: dict[str, str | None] = {"job-a": "RUNNING"}
    alive = status.get
    a = leases.acquire(lake, "run1", "job-a", alive, by="test")
    try:
        leases.acquire(lake, "run1", "job-b", alive, by="test")
        raise AssertionError("a live holder's lease was taken")
    except ConfigError as exc:
        assert "job-a" in exc.message and exc.exit_code == 2
    assert a.heartbeat()
    a.check()
    status["job-a"] = "STOPPED"
    takers = race(RACERS, lambda i: _try_acquire(lake, f"job-t{i}", alive))
    won = [t for t in takers if isinstance(t, leases.Lease)]
    assert len(won) == 1, f"{len(won)} of {RACERS} takers got the dead job's lease"
    refused = [t for t in takers if not isinstance(t, leases.Lease)]
    assert all(won[0].owner in msg for msg in refused), refused[:2]
    assert won[0].doc["replaced"][-1]["owner"] == "job-a"
    assert not a.heartbeat(), "the replaced attempt still renewed the lease"
    try:
        a.check()
        raise AssertionError("the replaced attempt still passed its lease check")
    except leases.LeaseLostError:
        pass
    assert won[0].release()
    assert leases.read(lake, "run1") is None


def _try_acquire(lake: Lake, owner: str, alive: leases.Liveness) -> leases.Lease | str:
    try:
        return leases.acquire(lake, "run1", owner, alive, by="test")
    except ConfigError as exc:
        return exc.message


def _fake_model(workdir: Path, i: int) -> tuple[Path, str]:
    """A stand-in weights file (the registry copies bytes) and its SHA-256."""
    path = workdir / f"weights-{i}.keras"
    path.write_bytes(b"weights of registration %d " % i * (50 + i))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def check_concurrent_registrations(lake: Lake, workdir: Path, name: str = "m") -> None:
    """Every registration of one name at once succeeds with its own version, and each card
    sits beside its own weights."""
    models = [_fake_model(workdir, i) for i in range(RACERS)]
    registry.register(lake, str(models[0][0]), _card(name, models[0][1]))  # an existing v1

    def register(i: int) -> int:
        path, digest = models[i]
        version = registry.register(lake, str(path), _card(name, digest)).version
        assert version is not None
        return version

    versions = race(RACERS, register)
    assert len(set(versions)) == RACERS, f"versions handed out twice: {sorted(versions)}"
    assert sorted(versions) == list(range(2, RACERS + 2))
    assert registry.versions(lake, name) == list(range(1, RACERS + 2))
    for version in versions:
        card = registry.resolve(lake, f"{name}:{version}")
        weights = lake.read_bytes(layout.model_file(name, version))
        assert hashlib.sha256(weights).hexdigest() == card.source, \
            f"version {version}: the card belongs to other weights"


def check_concurrent_dataset_claims(lake: Lake) -> None:
    versions = race(RACERS, lambda i: catalog.claim_version(lake, "d", owner=f"job-{i}"))
    assert sorted(versions) == list(range(1, RACERS + 1)), versions
    owners = {lake.read_json(layout.dataset_claim("d", v))["owner"] for v in versions}
    assert len(owners) == RACERS
    assert catalog.claim_version(lake, "d") == RACERS + 1
    assert catalog.committed_versions(lake, "d") == []  # a claim is not a commit


def _card(name: str, digest: str) -> ModelCard:
    return ModelCard(name=name, labels=["a"], multi_label=False, input_size=8, channels=1,
                     arch="external", source=digest)


def register_in_process(lake_uri: str, name: str, path: str, digest: str) -> int:
    """One registration, for a process pool (each process builds its own Lake)."""
    version = registry.register(Lake(lake_uri), path, _card(name, digest)).version
    assert version is not None
    return version


def check_registrations_from_processes(lake: Lake, workdir: Path, name: str = "p") -> None:
    """As :func:`check_concurrent_registrations`, with one process per registration."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    models = [_fake_model(workdir, 100 + i) for i in range(4)]
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(register_in_process, lake.uri, name, str(p), d)
                   for p, d in models]
        versions = [f.result(timeout=120) for f in futures]
    assert sorted(versions) == [1, 2, 3, 4], versions
    for (_, digest), version in zip(models, versions, strict=True):
        assert registry.resolve(lake, f"{name}:{version}").source == digest
        weights = lake.read_bytes(layout.model_file(name, version))
        assert hashlib.sha256(weights).hexdigest() == digest
