"""What Ray runs for the publish job in other processes: one batch of SRs built and stored.

The original's patient and study attributes are fetched by WADO-RS metadata and held in this
task's memory only, so the SR files under the right patient and study in the PACS; they are
never logged, returned or written to the lake. A failure is counted per instance by kind, never
named by UID; refused credentials (401/403) fail the job (exit 2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from medray.cluster.infra import logs
from medray.cluster.infra.dicomweb_client import Client, Unreachable, load_auth
from medray.workers import dicomweb, sr
from medray.workers.errors import InfraError, NotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One scored instance to publish: its original UIDs and what the SR states."""

    instance: dicomweb.Instance
    finding: sr.Finding


def publish_batch(to: str, auth_file: str | None, items: list[Item]) -> dict[str, Any]:
    """Build and store the SRs of ``items``: counts of stored SRs and errors by kind."""
    logs.configure()
    client = Client(dicomweb.parse_endpoint(to), load_auth(auth_file))
    errors: dict[str, int] = {}
    parts: list[bytes] = []
    for item in items:
        try:
            meta = client.get_json(f"{item.instance.path()}/metadata",
                                   what="WADO-RS metadata")
            if not isinstance(meta, list) or len(meta) != 1 or not isinstance(meta[0], dict):
                raise InfraError("the metadata answer is not one DICOM JSON object")
            parts.append(sr.sr_bytes(sr.build_sr(sr.original_from_json(meta[0]),
                                                 item.finding)))
        except Unreachable:
            errors["unreachable"] = errors.get("unreachable", 0) + 1
        except (NotFoundError, InfraError):  # gone from the PACS, or a metadata it garbled
            errors["original_not_found"] = errors.get("original_not_found", 0) + 1
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("an SR could not be built: %s", type(exc).__name__)
            errors["sr_build"] = errors.get("sr_build", 0) + 1
    stored = 0
    if parts:
        content_type, body = dicomweb.build_multipart(parts)
        try:
            _, answer = client.post("studies", body, content_type)
            failed = dicomweb.stow_failures(_json(answer))
            stored = len(parts) - len(failed)
            if failed:
                errors["stow_refused"] = errors.get("stow_refused", 0) + len(failed)
        except Unreachable:
            errors["unreachable"] = errors.get("unreachable", 0) + len(parts)
        except InfraError:  # refused as a whole (409 and the like)
            errors["stow_refused"] = errors.get("stow_refused", 0) + len(parts)
    return {"stored": stored, "errors": errors}


def _json(body: bytes) -> Any:
    import json

    try:
        return json.loads(body) if body.strip() else {}
    except ValueError:
        return {}
