"""Report rows -> Parquet tables whose column types depend on the column name, never on the data.

An all-null AUROC column of a run without ground truth is still float64 and a missing
``compare`` still a string, so the tables of many reports stack (e.g. one DuckDB query over
``runs/*/report/per_label_metrics.parquet``). A column not named here is float64.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from medray.workers.jsonsafe import json_safe

_INT_COLUMNS = {"images", "with_truth", "positives", "negatives", "tp", "fp", "tn", "fn",
                "paired_images", "reference_images", "bin", "count", "rank", "model_version",
                "dataset_version", "errors", "dropped", "n_boot", "patients", "heatmaps",
                "score_jobs", "groups", "min_cases", "flagged_gaps"}
_STR_COLUMNS = {"label", "source", "run_id", "model", "dataset", "split", "ci_unit", "ci_note",
                "reference", "compare", "created_at", "report_uri", "html_uri", "image_id",
                "uri", "layer", "currency", "rule", "attribute", "group", "metric", "high",
                "low", "heatmaps_note", "calibration"}
_LIST_COLUMNS = {"labels", "drifted_labels", "subgroup_attributes"}
_BOOL_COLUMNS = {"drifted", "primary", "flagged"}


def column_type(name: str) -> pa.DataType:
    if name in _INT_COLUMNS:
        return pa.int64()
    if name in _STR_COLUMNS:
        return pa.string()
    if name in _LIST_COLUMNS:
        return pa.list_(pa.string())
    if name in _BOOL_COLUMNS:
        return pa.bool_()
    return pa.float64()


def table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> a table with the columns in first-seen order; NaN is stored as null."""
    rows = json_safe(rows)
    names: list[str] = []
    for r in rows:
        names.extend(k for k in r if k not in names)
    schema = pa.schema([pa.field(n, column_type(n)) for n in names])
    return pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows], schema=schema)
