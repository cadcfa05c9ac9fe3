"""The publish job on the job driver: a committed run's predictions as one DICOM SR per scored
instance, stored in a PACS by STOW-RS.

The lake holds only pseudonyms; the staging's private linkage (``store.linkage``) turns each
row's pseudonym back into the DICOMweb URI it was staged from, which carries the original
study, series and SOP instance UIDs. Rows not staged from DICOMweb are counted and left out.
Batches go to Ray tasks (``remote.publish_batch``). The SR UIDs derive from the run id and the
original UIDs, so publishing again stores the same SRs (a PACS keeps one instance per UID):
after a partial failure, run the same command again. Nothing is written to the lake.
"""

from __future__ import annotations

import logging
from typing import Any

from medray.cluster.infra.context import JobContext
from medray.cluster.publish.remote import Item, publish_batch
from medray.cluster.store import layout, linkage, registry, runs
from medray.cluster.store.lake import Lake
from medray.workers import dicomweb, sr
from medray.workers.errors import InfraError, NotFoundError
from medray.workers.models import ModelCard
from medray.workers.specs import PublishSpec

log = logging.getLogger(__name__)
TASK_CPUS = 0.25  # network-bound: the HTTP round trips, not the CPU, set the pace


def run(spec: PublishSpec, lake: Lake, ctx: JobContext) -> dict[str, Any]:
    """Publish ``spec.run_id`` to ``spec.to`` (see the module doc)."""
    import ray

    endpoint = dicomweb.parse_endpoint(spec.to)
    doc = lake.read_json_or_none(layout.run_doc(spec.run_id))
    if doc is None:
        raise NotFoundError(f"run {spec.run_id!r} has no run.json: is it a score run?")
    runs.read_commit(lake, spec.run_id)
    card = registry.resolve(lake, f"{doc['model']}:{doc['model_version']}")
    items, skipped = _items(spec, lake, doc, card)
    log.info("%s: %d scored instances to publish to %s, %d rows not staged from DICOMweb",
             spec.run_id, len(items), endpoint.uri, skipped)
    task = ray.remote(num_cpus=TASK_CPUS, max_retries=0)(publish_batch)
    refs = [task.remote(spec.to, spec.auth_file, items[i:i + spec.batch])
            for i in range(0, len(items), spec.batch)]
    stored, errors = 0, dict[str, int]()
    for out in ray.get(refs):
        stored += out["stored"]
        for kind, n in out["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    if errors:
        raise InfraError(f"{sum(errors.values())} of {len(items)} SRs were not stored "
                         f"({errors}); {stored} were. Run the same publish again: stored SRs "
                         "keep their UIDs, so nothing is duplicated")
    log.info("%s: %d SRs stored", spec.run_id, stored)
    return {"run_id": spec.run_id, "to": endpoint.uri, "published": stored,
            "instances": len(items), "not_from_dicomweb": skipped,
            "model": card.name, "model_version": card.version}


def _items(spec: PublishSpec, lake: Lake, doc: dict[str, Any],
           card: ModelCard) -> tuple[list[Item], int]:
    labels: list[str] = list(doc["labels"])
    preds = runs.read_predictions(lake, spec.run_id, columns=[
        "source_uri", "predicted_labels", *(f"score_{lab}" for lab in labels)])
    uris = _linkage(lake, doc, spec.linkage, set(preds.column("source_uri").to_pylist()))
    primary = {p["label"]: p for p in card.operating_points if p.get("primary", True)}
    thresholds: dict[str, float] = dict(doc.get("thresholds") or card.thresholds or {})
    rule = next(iter(primary.values()), {}).get("rule") or ("thresholds" if thresholds
                                                            else "argmax")
    items: dict[str, Item] = {}
    skipped = 0
    for row in preds.to_pylist():
        uri = uris.get(row["source_uri"])
        if not uri or not dicomweb.is_dicomweb(uri):
            skipped += 1
            continue
        _, inst = dicomweb.parse_instance_uri(uri)
        chosen = set(row["predicted_labels"] or [])
        results = [sr.LabelResult(lab, float(row[f"score_{lab}"]), lab in chosen,
                                  thresholds.get(lab) if thresholds else None)
                   for lab in labels]
        finding = sr.Finding(spec.run_id, card.name, int(card.version or 0),
                             bool(card.calibration), str(rule), tuple(results))
        items.setdefault(inst.sop, Item(inst, finding))
    return [items[k] for k in sorted(items)], skipped


def _linkage(lake: Lake, doc: dict[str, Any], where: str | None,
             wanted: set[str]) -> dict[str, str]:
    """pseudonym -> source URI for ``wanted``: the run's dataset version first, then the
    earlier versions (images a version carried over were linked when first staged)."""
    found: dict[str, str] = {}
    for version in range(int(doc["dataset_version"]), 0, -1):
        try:
            pairs = linkage.reveal(lake, doc["dataset"], version, where)
        except NotFoundError:
            continue
        found.update({k: v for k, v in pairs.items() if k in wanted and k not in found})
        if wanted <= found.keys():
            break
    if not found and wanted:
        raise NotFoundError(f"no private linkage for {doc['dataset']}:{doc['dataset_version']} "
                            "on this node: publish from the cluster that staged it, or give "
                            "--linkage as given to stage")
    return found
