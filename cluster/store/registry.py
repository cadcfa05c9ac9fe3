"""Model versions in the lake: ``models/<name>/<version>/{_CLAIM.json,model.keras,card.json}``.

A registration first claims its version number by creating ``_CLAIM.json`` only if absent
(``atomic.claim_next``: S3 ``If-None-Match: *``, a hard link on a local disk), so concurrent
registrations of one name get distinct versions; it then writes the weights and, last, the
card, which is the commit point. Aliases (``prod``) live in ``models/<name>/aliases.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medray.cluster.store import atomic, layout
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, NotFoundError
from medray.workers.models import ModelCard

_REF = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)(?::(?P<version>\d+)|@(?P<alias>[\w.-]+))?$"
)


def versions(lake: Lake, name: str) -> list[int]:
    found = [int(v) for v in lake.list_dirs(layout.model_root(name)) if v.isdigit()]
    return sorted(v for v in found if lake.exists(layout.model_card(name, v)))


def claim_version(lake: Lake, name: str, owner: str | None = None) -> int:
    """A version number of model ``name`` that no other registration can get: one past every
    version folder (committed or not, so an abandoned attempt is never reused), claimed with
    a create-if-absent ``_CLAIM.json``; on a lost race, the next number."""
    existing = [int(v) for v in lake.list_dirs(layout.model_root(name)) if v.isdigit()]
    doc = {"model": name, "owner": owner or f"pid-{os.getpid()}",
           "claimed_at": datetime.now(UTC).isoformat()}
    return atomic.claim_next(lake, existing, lambda v: layout.model_claim(name, v), doc)


def register(lake: Lake, model_file: str, card: ModelCard, owner: str | None = None) -> ModelCard:
    """Upload a .keras file and its card as a new version of ``card.name``: the version is
    claimed first, the weights written under the claim, the card (the commit point) last."""
    data = Path(model_file).read_bytes()  # read before claiming: a missing file claims nothing
    version = claim_version(lake, card.name, owner)
    card.version = version
    card.created_at = card.created_at or datetime.now(UTC).isoformat()
    lake.write_bytes(layout.model_file(card.name, version), data)
    lake.write_bytes(layout.model_card(card.name, version), card.to_json().encode())
    return card


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    m = _REF.match(ref)
    if not m:
        raise ConfigError(f"model reference {ref!r}: use NAME, NAME:VERSION or NAME@ALIAS")
    version = m.group("version")
    return m.group("name"), int(version) if version else None, m.group("alias")


def resolve(lake: Lake, ref: str) -> ModelCard:
    name, version, alias = parse_ref(ref)
    found = versions(lake, name)
    if not found:
        raise NotFoundError(
            f"no model {name!r} in {lake.uri}: train one (`medray train`) or register a .keras "
            "file (`medray models register`)"
        )
    if alias:
        aliases = lake.read_json_or_none(layout.model_aliases(name)) or {}
        if alias not in aliases:
            raise NotFoundError(f"model {name!r} has no alias @{alias} (has {sorted(aliases)})")
        version = int(aliases[alias])
    if version is None:
        version = found[-1]
    if version not in found:
        raise NotFoundError(f"model {name!r} has no version {version} (has {found})")
    return ModelCard.from_dict(lake.read_json(layout.model_card(name, version)))


def fetch(lake: Lake, card: ModelCard, cache_dir: str | None = None) -> str:
    """A local path to the model file, downloaded once into a private cache.

    The cache (default ``MEDRAY_HOME/cache/models``, 0700) is keyed by the lake's URI and the
    version's registration time as well as name and version, so a model of the same name and
    version from another lake, or from a lake re-created at the same place, is never used
    instead of the one asked for."""
    from medray.cluster.infra.home import medray_home

    if card.version is None:  # a card that was never registered has no file in the lake
        raise NotFoundError(f"model {card.name!r} has no registered version to fetch")
    root = Path(cache_dir) if cache_dir else medray_home() / "cache" / "models"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = hashlib.sha256(
        "\0".join((lake.uri, card.name, str(card.version), str(card.created_at))).encode()
    ).hexdigest()[:20]
    path = root / f"{card.name}-v{card.version}-{key}.keras"
    if not path.exists():
        tmp = root / f".{path.name}.{os.getpid()}.part"  # concurrent fetches never share a part
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(lake.read_bytes(layout.model_file(card.name, card.version)))
        tmp.replace(path)
    return str(path)


def promote(lake: Lake, name: str, version: int, alias: str) -> dict[str, int]:
    if version not in versions(lake, name):
        raise NotFoundError(f"model {name!r} has no version {version}")
    aliases = lake.read_json_or_none(layout.model_aliases(name)) or {}
    aliases[alias] = version
    lake.write_json(layout.model_aliases(name), aliases)
    return dict(aliases)


def list_models(lake: Lake) -> list[dict[str, Any]]:
    rows = []
    for name in lake.list_dirs("models"):
        aliases = lake.read_json_or_none(layout.model_aliases(name)) or {}
        for version in versions(lake, name):
            card = ModelCard.from_dict(lake.read_json(layout.model_card(name, version)))
            rows.append(
                {
                    "model": name,
                    "version": version,
                    "arch": card.arch,
                    "labels": card.labels,
                    "dataset": f"{card.dataset}:{card.dataset_version}" if card.dataset else "",
                    "aliases": sorted(a for a, v in aliases.items() if v == version),
                    "metrics": card.metrics,
                    "created_at": card.created_at,
                }
            )
    return rows
