"""YAML job specs for `medray submit`: kind + the options of that command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from medray.cluster.infra import env
from medray.workers.errors import ConfigError
from medray.workers.specs import build_spec


def load_spec_file(
    path: Path, overrides: list[str], lake: str | None
) -> tuple[str, dict[str, Any]]:
    """(kind, values) with precedence --set/--lake > environment > file > defaults."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): save the spec as "
                          "UTF-8 YAML") from None
    except OSError as exc:
        raise ConfigError(f"cannot read spec file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} must be a mapping with a 'kind' key")
    kind = doc.pop("kind", None)
    if not kind:
        raise ConfigError(f"{path} has no 'kind' (stage, train, score or report)")
    values: dict[str, Any] = dict(doc)
    if env.get(env.LAKE):
        values["lake"] = env.get(env.LAKE)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: use key=value")
        try:
            values[key.strip().replace("-", "_")] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    if lake:
        values["lake"] = lake
    source = values.get("source")
    if kind == "stage" and isinstance(source, str) and "://" not in source:
        candidate = (path.parent / source) if not Path(source).is_absolute() else Path(source)
        if candidate.exists():
            values["source"] = str(candidate.resolve())
    build_spec(str(kind), values)  # fail here, before submission, with a clear message
    return str(kind), values
