"""The report job: a committed run's predictions -> per-label metrics with patient-level CIs,
calibration (ECE with its CI), the rates at every operating point of the model card, metrics
per patient subgroup with the largest gaps, drift against a reference run, a paired
comparison with another run, Grad-CAM heatmaps -> Parquet tables and one self-contained HTML
file under ``runs/<run>/report/``; the model version's card then records the evaluation.

The data is passed over in distributed steps:
1. one Ray task per prediction file (of this run and of the runs it is held against) returns a
   mergeable ``Part`` (``inputs.load_run``); one task per dataset shard reads patient keys;
2. one Ray task per label computes the exact metrics and their bootstrap intervals
   (``workers/evaluation.py``), while the Grad-CAM task runs beside them (``heatmaps``);
3. the driver writes the tables, the HTML and the report's commit marker, then adds the
   evaluation to the model card (``evaluations[<run id>]``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from medray.cluster.infra import events
from medray.cluster.infra.context import JobContext
from medray.cluster.report import heatmaps, inputs, remote
from medray.cluster.store import layout, registry, runs
from medray.cluster.store.lake import Lake
from medray.workers import calibration, model_card, report_html
from medray.workers.errors import InfraError, InputError, NotFoundError
from medray.workers.evaluation import Report, build_report, result_metrics
from medray.workers.jsonsafe import json_safe
from medray.workers.model_card import ModelCard
from medray.workers.report_tables import table
from medray.workers.run_data import attributes_for, ci_note, pair_rows, patient_groups
from medray.workers.shards import now_utc
from medray.workers.specs import ReportSpec

log = logging.getLogger(__name__)


class _Phases:
    """Seconds per phase of the job, kept in the report's commit marker; each phase done is
    a step of the report's progress bar in the CLI."""

    NAMES = ("read_predictions", "patient_keys", "metrics", "heatmaps", "write")

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.timings: dict[str, float] = {}
        self.bar = events.Phase("report", "steps", len(self.NAMES))

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.timings[name] = round(now - self._last, 2)
        self._last = now
        if len(self.timings) == len(self.NAMES):
            self.bar.finish(step=name.replace("_", " "))
        else:
            self.bar.update(len(self.timings), force=True, step=name.replace("_", " "))

    def total(self) -> float:
        return round(time.monotonic() - self.started, 2)


def _ray_map(fn: Callable[..., Any], calls: list[dict[str, Any]]) -> list[Any]:
    """One Ray task per call (per label); arrays shared by every call (the bootstrap groups)
    go to the object store once."""
    import ray

    task = remote.as_task(remote.call, num_cpus=1)
    shared: dict[int, Any] = {}
    refs = []
    for kw in calls:
        args = dict(kw)
        g = args.get("groups")
        if g is not None:
            if id(g) not in shared:
                shared[id(g)] = ray.put(g)
            args["groups"] = shared[id(g)]
        refs.append(task.remote(fn, **args))
    return list(ray.get(refs))


def run(spec: ReportSpec, lake: Lake, ctx: JobContext) -> dict[str, Any]:
    """Report on the committed run ``spec.run_id``; returns the job result: run_id, metrics,
    report_uri, html_uri and the summary."""
    phases = _Phases()
    run_id = spec.run_id
    marker = runs.read_commit(lake, run_id)
    # Fail on a wrong --reference/--compare before any work.
    held_against = {r: runs.read_commit(lake, r) for r in (spec.reference, spec.compare) if r}
    lake.delete(layout.run_report_commit(run_id))  # a report being rewritten is not committed
    lake.delete_dir(layout.run_report_heatmaps(run_id))
    cur = inputs.load_run(lake, run_id, marker, keep_all=bool(held_against or spec.heatmaps))
    # Keyed by run id: one read serves both when --reference and --compare name the same run.
    loaded = {r: inputs.load_run(lake, r, m, keep_all=True) for r, m in held_against.items()}
    ref = loaded[spec.reference] if spec.reference else None
    other = loaded[spec.compare] if spec.compare else None
    if other is not None and pair_rows(cur, other)[0].size == 0 and cur.with_truth:
        raise InputError(f"runs {run_id} and {spec.compare} share no scored images with "
                         "ground truth: --compare needs a run of another model on the same "
                         "dataset")
    phases.done("read_predictions")
    card = _card(lake, marker)
    heat_ref = None
    if spec.heatmaps:
        if card is None:
            raise NotFoundError(f"model {marker['model']}:{marker['model_version']} is gone: "
                                "no model for heatmaps; run without --heatmaps")
        heat_ref = heatmaps.start(lake, marker, card, cur, spec.heatmaps, spec.heatmap_layer)
    wanted = _subgroups(spec.subgroups)
    keys = inputs.load_patient_keys(lake, marker, attributes=wanted != []) \
        if cur.with_truth else None
    groups, _ = patient_groups(cur.image_id, keys)
    # subgroup metrics need ground truth; a run without it has none to break down
    attributes = attributes_for(cur.image_id, keys, wanted) \
        if wanted != [] and cur.with_truth else {}
    dataset = f"{marker['dataset']}:{marker['dataset_version']}"
    unit, note, n_units = ci_note(groups[cur.known], dataset)
    phases.done("patient_keys")
    _, sources = inputs.thresholds(marker)
    points = [{k: p[k] for k in ("label", "rule", "threshold", "primary")}
              for p in card.operating_points] if card and card.operating_points else None
    report = build_report(cur, groups, spec.n_boot, sources, ref, other, spec.drift_psi,
                          _ray_map, points, attributes)
    phases.done("metrics")
    heat, heat_note = heatmaps.finish(lake, run_id, heat_ref)
    phases.done("heatmaps")
    drifted = [r["label"] for r in report.drift or [] if r.get("drifted")]
    summary = {
        "run_id": run_id, "model": marker["model"], "model_version": marker["model_version"],
        "dataset": marker["dataset"], "dataset_version": marker["dataset_version"],
        "split": marker.get("split"), "images": cur.images, "errors": marker.get("errors", 0),
        "dropped": cur.dropped, "with_truth": cur.with_truth, "labels": cur.labels,
        "n_boot": spec.n_boot, "ci_unit": unit, "ci_note": note, "patients": n_units,
        "reference": spec.reference, "compare": spec.compare,
        "drift_psi": spec.drift_psi if ref is not None else None, "drifted_labels": drifted,
        "heatmaps": len(heat), "heatmaps_note": heat_note,
        "calibration": calibration.describe(card.calibration if card else None),
        "subgroup_attributes": list(attributes),
        "flagged_gaps": sum(1 for g in report.gaps if g.get("flagged")),
        "created_at": now_utc().isoformat(),
        **runs.run_cost(lake, run_id, marker.get("images")),
        "report_uri": lake.full_uri(layout.run_report(run_id)),
        "html_uri": lake.full_uri(layout.run_report_html(run_id)),
    }
    _write(lake, run_id, summary, report, heat, card)
    phases.done("write")
    seconds = phases.total()
    lake.write_json(layout.run_report_commit(run_id), json_safe(
        {**summary, "job_id": ctx.job_id, "seconds": seconds, "timings": phases.timings}))
    if card is not None:
        _update_card(lake, card, summary, report)
    log.info("report for %s: %d images, %d with truth, %s CIs, %d drifted, %.1fs %s", run_id,
             cur.images, cur.with_truth, unit, len(drifted), seconds, phases.timings)
    return json_safe({"run_id": run_id, "metrics": result_metrics(report),
                      "report_uri": summary["report_uri"], "html_uri": summary["html_uri"],
                      "summary": summary})


def _card(lake: Lake, marker: dict[str, Any]) -> ModelCard | None:
    """The card of the model version that scored the run; None when it was deleted."""
    try:
        return registry.resolve(lake, f"{marker['model']}:{marker['model_version']}")
    except NotFoundError:
        log.warning("model %s:%s is gone: no operating points or card update", marker["model"],
                    marker["model_version"])
        return None


def _subgroups(value: str | None) -> list[str] | None:
    """--subgroups: None = the usual attributes the dataset has, [] = none, else the names."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    return [] if [n.lower() for n in names] in ([], ["none"]) else names


def _update_card(lake: Lake, card: ModelCard, summary: dict[str, Any], report: Report) -> None:
    """Record this report in the model version's card (re-read first: other reports may have
    added theirs since the job started; the last writer of a run id wins)."""
    assert card.version is not None
    rel = layout.model_card(card.name, card.version)
    fresh = ModelCard.from_dict(lake.read_json(rel))
    fresh.evaluations[summary["run_id"]] = model_card.evaluation_entry(
        summary, report.per_label, report.operating, report.subgroups, report.gaps)
    if report.subgroups:
        fresh.limitations = [x for x in fresh.limitations
                             if not x.startswith(model_card.NOT_MEASURED)]
    try:
        lake.write_json(rel, fresh.to_dict())
    except InfraError as exc:  # the report itself is committed; say what is missing
        log.warning("could not add this report to the card of %s:%s (%s); re-run the report "
                    "to record it", card.name, card.version, exc)
        return
    log.info("model card %s:%s: evaluation of run %s recorded", card.name, card.version,
             summary["run_id"])


def _write(lake: Lake, run_id: str, summary: dict[str, Any], report: Report,
           heat: list[dict[str, Any]], card: ModelCard | None) -> None:
    """Every table and the HTML page; the summary table last, before the commit marker."""
    html = report_html.render(report_html.document(
        summary, report.per_label, report.plots, report.drift, report.compare, heat,
        operating=report.operating, subgroups=report.subgroups, gaps=report.gaps,
        card=card.to_dict() if card else None))
    tables: list[tuple[str, list[dict[str, Any]] | None]] = [
        ("per_label_metrics", report.per_label),
        ("thresholds", report.thresholds),
        ("operating_points", report.operating or None),
        ("subgroups", report.subgroups or None),
        ("subgroup_gaps", report.gaps or None),
        ("calibration", report.calibration or None),
        ("drift", report.drift),
        ("compare", report.compare),
        ("heatmaps", heatmaps.table_rows(heat) or None),
    ]
    for name, rows in tables:
        if rows is not None:
            lake.write_parquet(layout.run_report_table(run_id, name), table(rows))
    lake.write_bytes(layout.run_report_html(run_id), html.encode())
    lake.write_parquet(layout.run_report_table(run_id, "summary"), table([summary]))
