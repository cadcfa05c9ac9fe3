"""The report job: aggregate a committed run's predictions into per-label metrics tables."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from medray.cluster import scoring
from medray.cluster.lake import Lake
from medray.workers import metrics
from medray.workers.scorer import score_column
from medray.workers.shards import labels_to_targets, now_utc

log = logging.getLogger(__name__)


def per_label(run: dict[str, Any], preds: pa.Table) -> list[dict[str, Any]]:
    labels = run["labels"]
    truth = preds.column("true_labels").to_pylist()
    known = np.array([t is not None for t in truth], dtype=bool)
    y = labels_to_targets([t or [] for t in truth], labels, multi_label=True)
    rows = []
    for j, label in enumerate(labels):
        scores = preds.column(score_column(label)).to_numpy(zero_copy_only=False)
        threshold = float(run.get("thresholds", {}).get(label, 0.5))
        row: dict[str, Any] = {
            "label": label,
            "images": int(len(scores)),
            "with_truth": int(known.sum()),
            "positive_rate": float(np.mean(scores >= threshold)) if len(scores) else float("nan"),
            "mean_score": float(np.mean(scores)) if len(scores) else float("nan"),
            "threshold": threshold,
        }
        yk, sk = y[known, j], scores[known]
        if known.any() and 0 < yk.sum() < len(yk):
            row["positives"] = int(yk.sum())
            row["auroc"] = metrics.auroc(yk, sk)
        else:
            row["positives"] = int(yk.sum()) if known.any() else None
            row["auroc"] = None
        rows.append(row)
    return rows


def run(spec: dict[str, Any], lake: Lake, job_id: str) -> dict[str, Any]:
    started = time.monotonic()
    run_id = spec["run_id"]
    marker = scoring.read_commit(lake, run_id)
    preds = scoring.read_predictions(lake, run_id)
    rows = per_label(marker, preds)
    base = f"runs/{run_id}/report"
    table = pa.Table.from_pylist(rows)
    lake.write_parquet(f"{base}/per_label_metrics.parquet", table)
    summary = {
        "run_id": run_id, "model": marker["model"], "model_version": marker["model_version"],
        "dataset": marker["dataset"], "dataset_version": marker["dataset_version"],
        "images": preds.num_rows, "errors": marker["errors"], "created_at": now_utc().isoformat(),
    }
    lake.write_parquet(f"{base}/summary.parquet", pa.Table.from_pylist([summary]))
    lake.write_json(f"{base}/_COMMITTED.json", {**summary, "job_id": job_id,
                                                "seconds": round(time.monotonic() - started, 2)})
    log.info("[%s] report for %s: %d images", job_id, run_id, preds.num_rows)
    return {"run_id": run_id, "metrics": {r["label"]: {k: v for k, v in r.items() if k != "label"}
                                          for r in rows},
            "summary": summary, "report_uri": lake.full_uri(base)}
