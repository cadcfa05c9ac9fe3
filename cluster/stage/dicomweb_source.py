"""Staging from a PACS over DICOMweb: QIDO-RS lists the instances on the job driver, WADO-RS
retrieves each one in the decoder actors (in memory, never on disk), and from there an instance
is a DICOM file like any other: the same decode, de-identification, de-duplication and errors
table (``remote.BatchDecoder``).

- ``listing``: the instance-level QIDO-RS searches of the spec (date range, modalities, raw
  filters), paged, as a ``Listing`` of item URIs ``<service>/studies/.../instances/<SOP>``;
  a search that fails after its retries fails the whole job (nothing was written yet).
- ``retrieve``: one instance's bytes by WADO-RS (``multipart/related; type=application/dicom``,
  any transfer syntax); network failures retried with backoff, then an errors row.
- ``--since-last``: each committed version lists, in ``dicomweb.parquet``, a keyed hash
  (HMAC with the de-identification salt) of the original SOP Instance UID of every instance it
  staged; the listing leaves out the instances any earlier version holds. The UIDs themselves
  go only to the private linkage.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pyarrow as pa

from medray.cluster.infra import faults
from medray.cluster.infra.dicomweb_client import Client, load_auth
from medray.cluster.infra.home import deid_salt
from medray.cluster.stage.listing import Listing, items_table
from medray.cluster.store import catalog, layout
from medray.cluster.store.lake import Lake
from medray.workers import attributes, dicomweb
from medray.workers.deid import Deidentifier
from medray.workers.errors import ConfigError, InfraError
from medray.workers.specs import StageSpec

log = logging.getLogger(__name__)

PAGE = 1000            # QIDO-RS results asked per request (limit/offset paging)
MAX_INSTANCES = 1_000_000
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
LEDGER_SCHEMA = pa.schema([pa.field("instance_key", pa.string())])

_clients: dict[tuple[str, str | None], Client] = {}
_lock = threading.Lock()


def client_for(endpoint: dicomweb.Endpoint, auth_file: str | None) -> Client:
    """One client per service and credentials source in this process (credentials read once)."""
    key = (endpoint.uri, auth_file)
    with _lock:
        if key not in _clients:
            _clients[key] = Client(endpoint, load_auth(auth_file))
        return _clients[key]


def instance_key(deid: Deidentifier, sop_uid: str) -> str:
    """The keyed hash that stands for an original SOP Instance UID in the lake."""
    return deid.patient_key(f"dicomweb-sop:{sop_uid}")


# ---------------------------------------------------------------------------- listing
def listing(spec: StageSpec, skip: set[str] | None = None) -> Listing:
    """The instances the spec's searches find (less those whose key is in ``skip``)."""
    endpoint = dicomweb.parse_endpoint(spec.source)
    client = client_for(endpoint, spec.auth_file)
    queries = dicomweb.qido_queries(
        dicomweb.parse_date_range(spec.study_date) if spec.study_date else None,
        dicomweb.parse_modalities(spec.modality) if spec.modality else [],
        dicomweb.parse_qido_filters(spec.qido))
    found: dict[str, dicomweb.Instance] = {}
    for params in queries:
        for inst in _search(client, params):
            found.setdefault(inst.sop, inst)
    deid = Deidentifier(deid_salt())
    items: list[dict[str, Any]] = []
    left_out = 0
    for sop in sorted(found):
        if skip and instance_key(deid, sop) in skip:
            left_out += 1
            continue
        items.append({"kind": "file", "uri": dicomweb.instance_uri(endpoint, found[sop])})
    log.info("QIDO-RS: %d instances found in %d searches, %d already staged by an earlier "
             "version", len(found), len(queries), left_out)
    time.sleep(faults.stage_pause_after_listing())  # tests only: a window to stop the PACS
    return Listing("dicom", items_table(items), len(items), [], False, False,
                   attributes=tuple(attributes.dicom_columns(spec.retain)))


def _search(client: Client, params: list[tuple[str, str]]) -> list[dicomweb.Instance]:
    out: list[dicomweb.Instance] = []
    seen = 0
    while True:
        page = [*params, ("includefield", dicomweb.SOP_CLASS), ("limit", str(PAGE)),
                ("offset", str(seen))]
        doc = client.get_json("instances", page)
        try:
            got = dicomweb.parse_qido_answer(doc)
        except ValueError as exc:
            raise InfraError(f"the QIDO-RS answer is malformed: {exc}") from None
        out.extend(got)
        seen += len(doc)  # documents (SRs) left out still count for the paging
        if len(doc) < PAGE:
            return out
        if len(out) >= MAX_INSTANCES:
            raise ConfigError(f"the DICOMweb search matches over {MAX_INSTANCES} instances: "
                              "narrow it with --study-date, --modality or --qido")


# ---------------------------------------------------------------------------- retrieval
def retrieve(uri: str, auth_file: str | None, max_bytes: int) -> bytes:
    """One instance's DICOM bytes by WADO-RS (held in memory only)."""
    endpoint, inst = dicomweb.parse_instance_uri(uri)
    content_type, body = client_for(endpoint, auth_file).get(
        inst.path(), accept=WADO_ACCEPT, max_bytes=max_bytes + 64 * 1024,
        what="WADO-RS retrieve")
    if content_type.lower().startswith("application/dicom"):
        return body
    try:
        parts = dicomweb.split_multipart(content_type, body)
    except ValueError as exc:
        raise InfraError(f"the WADO-RS answer is malformed: {exc}") from None
    if len(parts) != 1:
        raise InfraError(f"the WADO-RS answer holds {len(parts)} instances, not one")
    return parts[0]


# ---------------------------------------------------------------------------- since-last
def staged_keys(lake: Lake, dataset: str) -> set[str]:
    """Keys of every instance a committed version of ``dataset`` staged from DICOMweb."""
    keys: set[str] = set()
    for version in catalog.committed_versions(lake, dataset):
        rel = layout.dicomweb_instances(dataset, version)
        if lake.exists(rel):
            keys.update(lake.read_parquet(rel).column("instance_key").to_pylist())
    return keys


class Ledger:
    """The keys of the instances a version stages, written before its manifest."""

    def __init__(self) -> None:
        self.deid = Deidentifier(deid_salt())
        self.keys: set[str] = set()

    def add(self, raw_uris: list[str | None], failed: list[bool]) -> None:
        for uri, bad in zip(raw_uris, failed, strict=True):
            if uri and not bad and dicomweb.is_dicomweb(uri):
                self.keys.add(instance_key(self.deid, dicomweb.parse_instance_uri(uri)[1].sop))

    def write(self, lake: Lake, dataset: str, version: int) -> str:
        rel = layout.dicomweb_instances(dataset, version)
        lake.write_parquet(rel, pa.table({"instance_key": sorted(self.keys)},
                                         schema=LEDGER_SCHEMA))
        return rel
