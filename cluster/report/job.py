"""The report job: a committed run's predictions -> per-label metrics with patient-level CIs,
calibration, drift against a reference run, a paired comparison with another run, Grad-CAM
heatmaps -> Parquet tables and one self-contained HTML file under ``runs/<run>/report/``.

The data is passed over in distributed steps:
1. one Ray task per prediction file (of this run and of the runs it is held against) returns a
   mergeable ``Part`` (``inputs.load_run``); one task per dataset shard reads patient keys;
2. one Ray task per label computes the exact metrics and their bootstrap intervals
   (``workers/evaluation.py``), while the Grad-CAM task runs beside them (``heatmaps``);
3. the driver writes the tables, the HTML and, last, the report's commit marker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from medray.cluster.infra.context import JobContext
from medray.cluster.report import heatmaps, inputs, remote
from medray.cluster.store import layout, runs
from medray.cluster.store.lake import Lake
from medray.workers import report_html
from medray.workers.errors import InputError
from medray.workers.evaluation import Report, build_report, result_metrics
from medray.workers.jsonsafe import json_safe
from medray.workers.report_tables import table
from medray.workers.run_data import ci_note, pair_rows, patient_groups
from medray.workers.shards import now_utc
from medray.workers.specs import ReportSpec

log = logging.getLogger(__name__)


class _Phases:
    """Seconds per phase of the job, kept in the report's commit marker."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.timings: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.timings[name] = round(now - self._last, 2)
        self._last = now

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
    heat_ref = heatmaps.start(lake, marker, cur, spec.heatmaps) if spec.heatmaps else None
    keys = inputs.load_patient_keys(lake, marker) if cur.with_truth else None
    groups, _ = patient_groups(cur.image_id, keys)
    dataset = f"{marker['dataset']}:{marker['dataset_version']}"
    unit, note, n_units = ci_note(groups[cur.known], dataset)
    phases.done("patient_keys")
    _, sources = inputs.thresholds(marker)
    report = build_report(cur, groups, spec.n_boot, sources, ref, other, spec.drift_psi,
                          _ray_map)
    phases.done("metrics")
    heat = heatmaps.finish(lake, run_id, heat_ref)
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
        "heatmaps": len(heat), "created_at": now_utc().isoformat(),
        **runs.run_cost(lake, run_id, marker.get("images")),
        "report_uri": lake.full_uri(layout.run_report(run_id)),
        "html_uri": lake.full_uri(layout.run_report_html(run_id)),
    }
    _write(lake, run_id, summary, report, heat)
    phases.done("write")
    seconds = phases.total()
    lake.write_json(layout.run_report_commit(run_id), json_safe(
        {**summary, "job_id": ctx.job_id, "seconds": seconds, "timings": phases.timings}))
    log.info("report for %s: %d images, %d with truth, %s CIs, %d drifted, %.1fs %s", run_id,
             cur.images, cur.with_truth, unit, len(drifted), seconds, phases.timings)
    return json_safe({"run_id": run_id, "metrics": result_metrics(report),
                      "report_uri": summary["report_uri"], "html_uri": summary["html_uri"],
                      "summary": summary})


def _write(lake: Lake, run_id: str, summary: dict[str, Any], report: Report,
           heat: list[dict[str, Any]]) -> None:
    """Every table and the HTML page; the summary table last, before the commit marker."""
    html = report_html.render(report_html.document(summary, report.per_label, report.plots,
                                                   report.drift, report.compare, heat))
    tables: list[tuple[str, list[dict[str, Any]] | None]] = [
        ("per_label_metrics", report.per_label),
        ("thresholds", report.thresholds),
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
