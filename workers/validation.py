"""What a trained model's card says about it on its validation split, computed once from the
best epoch's validation scores: the temperature scaling, the operating points by their rules
(on the calibrated scores the scorer will output), and the metrics with patient-level 95%
bootstrap intervals at the primary operating point. Pure numpy; the training job's rank 0
calls it at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medray.workers import calibration
from medray.workers import operating_points as op
from medray.workers.evaluation import label_metrics

N_BOOT = 1000
# The validation metrics the card keeps per label (each with _lo/_hi where it has an interval)
_KEEP = ("with_truth", "positives", "auroc", "auprc", "ece", "sensitivity", "specificity",
         "ppv", "npv", "f1")


def _units(groups: np.ndarray | None, n: int) -> tuple[np.ndarray | None, str]:
    if groups is None or len(groups) != n:
        return None, f"95% bootstrap intervals over images ({n}): no patient keys"
    patients = sum(1 for g in groups if str(g).startswith("patient:"))
    units = len(set(groups.tolist()))
    if patients == n:
        return groups, f"95% bootstrap intervals over patients ({units} patients, {n} images)"
    return groups, (f"95% bootstrap intervals over patients; {n - patients} of {n} images "
                    "without a patient key count as their own patient")


def summarise(y: np.ndarray, raw: np.ndarray, groups: np.ndarray | None, labels: Sequence[str],
              multi_label: bool, split: str, rules: Sequence[op.Rule], calibrate: bool = True,
              n_boot: int = N_BOOT, form: str = calibration.TEMPERATURE) -> dict[str, Any]:
    """{calibration, operating_points, thresholds, validation} for the card, from validation
    targets ``y``, the model's raw scores and each row's bootstrap unit; ``form`` is the
    calibration form asked for (``calibration.FORMS``)."""
    y = np.asarray(y, dtype=np.float32)
    if calibrate and len(y):
        cal, scores = calibration.calibrate(raw, y, labels, multi_label, split, form)
    else:
        cal, scores = {}, np.asarray(raw, dtype=np.float32)
    points = op.choose(y, scores, labels, rules, split)
    thresholds = op.primary_thresholds(points)
    units, note = _units(groups, len(y))
    per_label: dict[str, dict[str, Any]] = {}
    for j, label in enumerate(labels):
        row, _ = label_metrics(y[:, j].astype(bool), scores[:, j], thresholds[label], units,
                               n_boot)
        per_label[label] = {k: row.get(k) for k in _KEEP}
        for k in _KEEP:
            for side in ("_lo", "_hi"):
                if f"{k}{side}" in row:
                    per_label[label][f"{k}{side}"] = row[f"{k}{side}"]
        per_label[label]["threshold"] = thresholds[label]
    finite = [v["auroc"] for v in per_label.values()
              if v.get("auroc") is not None and math.isfinite(v["auroc"])]
    validation = {"split": split, "images": int(len(y)), "ci": note, "n_boot": n_boot,
                  "scores": "calibrated" if cal else "raw",
                  "mean_auroc": float(np.mean(finite)) if finite else math.nan,
                  "labels": per_label}
    return {"calibration": cal, "operating_points": points, "thresholds": thresholds,
            "validation": validation}
