"""The report's pure numbers (workers/run_data.py, evaluation.py, report_tables.py; no Ray)
checked against scikit-learn and scipy on the same in-memory predictions, and its HTML rendered
in headless Chromium.

Chromium: Debian package ``chromium`` (``apt-get install -y chromium``); the render test skips
with a reason when no binary is found.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from scipy import stats
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve

from medray.workers import bootstrap, drift, metrics, report_html, report_tables
from medray.workers import evaluation as ev
from medray.workers import run_data as rd
from medray.workers.gradcam import overlay, to_png

LABELS = ["effusion", "nodule"]
THRESHOLDS = [0.4137, 0.6291]  # not multiples of the streamed 1/1000 bins


# --------------------------------------------------------------------------- synthetic runs


def make_run(seed: int, n_patients: int = 120, per_patient: int = 3, shift: float = 0.0,
             unknown: float = 0.1, ids: list[str] | None = None) -> tuple[pa.Table, pa.Table]:
    """(predictions, patient keys). Images of one patient share a latent severity, so they are
    correlated; ``shift`` moves the first label's scores up (drift); ``unknown`` of the rows
    have no ground truth (null ``true_labels``)."""
    rng = np.random.default_rng(seed)
    n = n_patients * per_patient
    patient = np.repeat(np.arange(n_patients), per_patient)
    severity = rng.normal(size=n_patients)[patient]
    image_ids = ids or [f"img{seed}-{i:05d}" for i in range(n)]
    truth: list[list[str] | None] = []
    cols: dict[str, list[float]] = {f"score_{lab}": [] for lab in LABELS}
    y = np.zeros((n, len(LABELS)), dtype=bool)
    for j, _ in enumerate(LABELS):
        y[:, j] = rng.random(n) < 1 / (1 + np.exp(-(severity - 0.5 + 0.3 * j)))
    for j, lab in enumerate(LABELS):
        logit = 1.2 * y[:, j] + 0.6 * severity + rng.normal(scale=0.8, size=n) - 0.5
        logit += shift if j == 0 else 0.0
        cols[f"score_{lab}"] = (1 / (1 + np.exp(-logit))).astype(np.float32).tolist()
    for i in range(n):
        truth.append(None if rng.random() < unknown else
                     [lab for j, lab in enumerate(LABELS) if y[i, j]])
    preds = pa.table({
        "image_id": pa.array(image_ids, pa.string()),
        "source_uri": pa.array([f"mem://{i}" for i in image_ids], pa.string()),
        "true_labels": pa.array(truth, pa.list_(pa.string())),
        **{k: pa.array(v, pa.float32()) for k, v in cols.items()},
    })
    keys = pa.table({"image_id": pa.array(image_ids, pa.string()),
                     "patient_key": pa.array([f"p{seed}-{p}" for p in patient], pa.string())})
    return preds, keys


def load(preds: pa.Table, keep_all: bool = True, n_files: int = 3,
         thresholds: list[float] = THRESHOLDS) -> rd.RunData:
    """Split the table into files, summarize each (as the Ray tasks do), merge out of order."""
    bounds = np.linspace(0, preds.num_rows, n_files + 1).astype(int)
    parts = [rd.summarize(preds.slice(a, b - a), LABELS, thresholds, keep_all, i)
             for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
    return rd.combine(parts[::-1], LABELS, thresholds)


def truth_of(preds: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    t = preds.column("true_labels").to_pylist()
    known = np.array([v is not None for v in t])
    y = np.array([[lab in (v or []) for lab in LABELS] for v in t], dtype=int)
    return known, y


def scores_of(preds: pa.Table, label: str) -> np.ndarray:
    return preds.column(f"score_{label}").to_numpy().astype(np.float64)


def report_for(preds: pa.Table, keys: pa.Table | None, n_boot: int = 200, **kw) -> ev.Report:
    run = load(preds)
    groups, _ = rd.patient_groups(run.image_id, keys)
    return ev.build_report(run, groups, n_boot, ["model card"] * 2, **kw)


# --------------------------------------------------------------------------- vs scikit-learn


@pytest.mark.parametrize("seed", [0, 1])
def test_every_metric_matches_sklearn(seed: int) -> None:
    preds, keys = make_run(seed)
    report = report_for(preds, keys)
    known, y_all = truth_of(preds)
    for j, label in enumerate(LABELS):
        row = report.per_label[j]
        s_all = scores_of(preds, label)
        y, s = y_all[known, j], s_all[known]
        thr = THRESHOLDS[j]
        pred = (s >= thr).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert row["label"] == label
        assert row["images"] == preds.num_rows
        assert row["with_truth"] == int(known.sum())
        assert row["positives"] == int(y.sum()) and row["negatives"] == int((1 - y).sum())
        assert row["prevalence"] == pytest.approx(y.mean(), abs=1e-12)
        assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn)
        assert row["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-6)
        assert row["auprc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-6)
        assert row["sensitivity"] == pytest.approx(skm.recall_score(y, pred), abs=1e-9)
        assert row["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0),
                                                   abs=1e-9)
        assert row["ppv"] == pytest.approx(skm.precision_score(y, pred), abs=1e-9)
        assert row["npv"] == pytest.approx(skm.precision_score(y, pred, pos_label=0), abs=1e-9)
        assert row["f1"] == pytest.approx(skm.f1_score(y, pred), abs=1e-9)
        assert row["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-9)
        # positive rate and mean score are over every image, with or without ground truth
        assert row["positive_rate"] == pytest.approx(np.mean(s_all >= thr), abs=1e-12)
        assert row["mean_score"] == pytest.approx(s_all.mean(), abs=1e-6)
        assert row["threshold"] == thr
        # calibration: ECE from sklearn's reliability curve, weighted by bin size
        prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="uniform")
        sizes = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], s), minlength=10)
        ece = np.sum(sizes[sizes > 0] / len(s) * np.abs(prob_true - prob_pred))
        assert row["ece"] == pytest.approx(ece, abs=1e-9)
        cal = [c for c in report.calibration if c["label"] == label and c["count"]]
        np.testing.assert_allclose([c["frac_positive"] for c in cal], prob_true, atol=1e-12)
        np.testing.assert_allclose([c["mean_score"] for c in cal], prob_pred, atol=1e-9)
        # CIs bracket their point estimates
        for name in ("auroc", "auprc", "f1", "sensitivity", "specificity", "ppv", "npv"):
            assert row[f"{name}_lo"] <= row[name] <= row[f"{name}_hi"], name
        # the plotted curve is sklearn's curve (fewer points than the thinning limit here)
        fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
        plot = report.plots[label]
        if len(fpr) <= ev.MAX_CURVE_POINTS:
            np.testing.assert_allclose(plot["roc"]["x"], fpr, atol=1e-12)
            np.testing.assert_allclose(plot["roc"]["y"], tpr, atol=1e-12)
        assert plot["op"]["tpr"] == row["sensitivity"]
        assert plot["op"]["fpr"] == pytest.approx(fp / (fp + tn))
        hist = np.histogram(s_all, bins=np.linspace(0, 1, 21))[0]
        assert plot["histogram"]["counts"] == hist.tolist()
        trow = report.thresholds[j]
        assert (trow["label"], trow["threshold"], trow["source"]) == (label, thr, "model card")
        assert trow["positive_rate"] == row["positive_rate"]


def test_truth_matrix_tells_unknown_from_negative() -> None:
    arr = pa.array([["a", "b"], None, [], ["b", "zzz"]], pa.list_(pa.string()))
    known, y = rd.truth_matrix(arr, ["a", "b"])
    assert known.tolist() == [True, False, True, True]
    assert y.tolist() == [[True, True], [False, False], [False, False], [False, True]]


def test_summarize_counts_and_drops_nonfinite_rows() -> None:
    preds, _ = make_run(3, n_patients=10)
    scores = preds.column("score_nodule").to_pylist()
    scores[0], scores[1] = None, float("nan")
    preds = preds.set_column(preds.column_names.index("score_nodule"), "score_nodule",
                             pa.array(scores, pa.float32()))
    run = load(preds, keep_all=True)
    assert run.rows == 30 and run.dropped == 2 and run.images == 28
    assert run.stats[0].count == 28 and run.image_id.size == 28
    only_truth = load(preds, keep_all=False)
    assert only_truth.image_id.size == int(only_truth.known.sum()) == only_truth.with_truth


def test_missing_score_column_is_an_input_error() -> None:
    preds, _ = make_run(0, n_patients=5)
    from medray.workers.errors import InputError

    with pytest.raises(InputError, match="score_nodule"):
        rd.summarize(preds.drop_columns(["score_nodule"]), LABELS, THRESHOLDS, False)


def test_label_without_positives_gives_null_in_json() -> None:
    preds, keys = make_run(4, n_patients=20, unknown=0.0)
    preds = preds.set_column(2, "true_labels",
                             pa.array([["nodule"] if "nodule" in t else []
                                       for t in preds.column("true_labels").to_pylist()],
                                      pa.list_(pa.string())))
    report = report_for(preds, keys, n_boot=50)
    out = ev.result_metrics(report)
    text = json.dumps(out, allow_nan=False)  # raises if a NaN slipped through
    assert out["effusion"]["auroc"] is None and out["effusion"]["auroc_lo"] is None
    assert out["effusion"]["positives"] == 0
    assert out["nodule"]["auroc"] is not None
    assert "NaN" not in text


def test_tables_keep_their_types_without_ground_truth() -> None:
    """A nightly run (no truth) writes the same column types as an evaluated one."""
    evaluated = report_for(*make_run(5, n_patients=20))
    nightly = report_for(make_run(6, n_patients=20, unknown=1.0)[0], None)
    a, b = report_tables.table(evaluated.per_label), report_tables.table(nightly.per_label)
    assert a.schema == b.schema
    assert b.schema.field("auroc").type == pa.float64()
    assert b.schema.field("tp").type == pa.int64()
    assert b.column("auroc").null_count == 2 and b.column("positive_rate").null_count == 0
    summary = report_tables.table([{"run_id": "r", "labels": LABELS, "drifted_labels": [],
                          "compare": None, "drift_psi": None, "images": 3}])
    assert summary.schema.field("drifted_labels").type == pa.list_(pa.string())
    assert summary.schema.field("compare").type == pa.string()


def test_empty_run_reports_and_renders() -> None:
    preds, _ = make_run(7, n_patients=1)
    run = load(preds.slice(0, 0), n_files=1)
    report = ev.build_report(run, None, 100)
    assert [r["images"] for r in report.per_label] == [0, 0]
    assert all(math.isnan(r["positive_rate"]) for r in report.per_label)
    doc = report_html.document({"run_id": "empty"}, report.per_label, report.plots, None, None)
    assert "no ground truth" in report_html.render(doc)


# --------------------------------------------------------------------------- bootstrap


def _identical_patients(n_patients: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every patient has the same four images: positives 0.8 and 0.4, negatives 0.6 and 0.3."""
    y = np.tile([1, 0, 1, 0], n_patients)
    s = np.tile([0.8, 0.6, 0.4, 0.3], n_patients)
    g = np.repeat(np.arange(n_patients), 4).astype(str)
    return y, s, g


def test_patient_bootstrap_known_answer() -> None:
    """Resampling whole patients of identical make-up cannot change any metric: the interval
    collapses to the point (AUROC 3/4, F1 at 0.5 = 1/2), while resampling images varies."""
    y, s, g = _identical_patients(60)
    by_patient, _ = ev.label_metrics(y, s, 0.5, g, n_boot=300)
    assert by_patient["auroc"] == pytest.approx(0.75)
    assert by_patient["auroc_lo"] == pytest.approx(0.75) == by_patient["auroc_hi"]
    assert by_patient["f1"] == pytest.approx(0.5)
    assert by_patient["f1_lo"] == pytest.approx(0.5) == by_patient["f1_hi"]
    assert by_patient["sensitivity_lo"] == pytest.approx(0.5) == by_patient["sensitivity_hi"]
    by_image, _ = ev.label_metrics(y, s, 0.5, None, n_boot=300)
    assert by_image["auroc_lo"] < 0.75 < by_image["auroc_hi"]
    assert by_image["f1_lo"] < 0.5 < by_image["f1_hi"]


def test_patient_bootstrap_width_matches_delong_of_one_image_per_patient() -> None:
    """Four copies of each patient's image carry the information of one: the patient interval
    has the width of DeLong's normal interval on the de-duplicated data; the image interval
    pretends to have 4x the data and is about half as wide."""
    rng = np.random.default_rng(5)
    n = 400
    y1 = rng.integers(0, 2, n)
    s1 = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.0 * y1)))  # report scores are probabilities
    y, s, g = np.repeat(y1, 4), np.repeat(s1, 4), np.repeat(np.arange(n), 4)
    pos, neg = s1[y1 == 1], s1[y1 == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    var = psi.mean(axis=1).var(ddof=1) / pos.size + psi.mean(axis=0).var(ddof=1) / neg.size
    delong_width = 2 * 1.959964 * math.sqrt(var)
    by_patient, _ = ev.label_metrics(y, s, 0.5, g, n_boot=2000)
    by_image, _ = ev.label_metrics(y, s, 0.5, None, n_boot=2000)
    w_patient = by_patient["auroc_hi"] - by_patient["auroc_lo"]
    w_image = by_image["auroc_hi"] - by_image["auroc_lo"]
    assert w_patient == pytest.approx(delong_width, rel=0.15)
    assert w_image == pytest.approx(delong_width / 2, rel=0.2)


def test_threshold_ci_matches_per_resample_bootstrap() -> None:
    """The matrix-product bootstrap of F1/sensitivity/... agrees with bootstrap.bootstrap_ci
    calling threshold_metrics once per resample (same distribution, other random draws)."""
    preds, keys = make_run(8, n_patients=150)
    run = load(preds, keep_all=False)
    groups, _ = rd.patient_groups(run.image_id, keys)
    y, s = run.y[:, 1], run.scores[:, 1].astype(np.float64)
    fast = bootstrap.threshold_ci(y, s, 0.5, groups, n_boot=4000, seed=1)
    for name in ("f1", "sensitivity", "ppv"):
        def fn(yy, ss, name=name):
            return metrics.threshold_metrics(yy, ss, 0.5)[name]

        _, lo, hi = bootstrap.bootstrap_ci(fn, y, s, groups=groups, n_boot=4000, seed=2)
        assert fast[name][0] == pytest.approx(lo, abs=0.012), name
        assert fast[name][1] == pytest.approx(hi, abs=0.012), name


def test_patient_groups_and_ci_note() -> None:
    preds, keys = make_run(0, n_patients=10)
    run = load(preds)
    groups, keyed = rd.patient_groups(run.image_id, keys)
    assert keyed == 30 and len(set(groups)) == 10
    unit, note, units = rd.ci_note(groups, "cxr:1")
    assert (unit, units) == ("patient", 10)
    assert "resample patients (10 patients, 30 images)" in note
    alone, keyed = rd.patient_groups(run.image_id, None)
    assert keyed == 0 and len(set(alone)) == 30
    unit, note, units = rd.ci_note(alone, "cxr:1")
    assert (unit, units) == ("image", 30)
    assert "no patient key" in note and "resample images" in note
    half, keyed = rd.patient_groups(run.image_id, keys.slice(0, 15))
    assert keyed == 15 and len(set(half)) == 5 + 15
    unit, note, units = rd.ci_note(half, "cxr:1")
    assert (unit, units) == ("patient+image", 20)
    assert "15 of 30 images have no patient key" in note
    assert rd.ci_note(half[:0], "cxr:1")[0] == "none"


# --------------------------------------------------------------------------- drift, compare


def test_drift_flags_the_shifted_label_only() -> None:
    reference = load(make_run(10, n_patients=300)[0])
    same = load(make_run(11, n_patients=300)[0])
    shifted_preds = make_run(12, n_patients=300, shift=1.5)[0]
    shifted = load(shifted_preds)
    calm = ev.drift_rows(same, reference, psi_threshold=0.2)
    assert [r["drifted"] for r in calm] == [False, False]
    rows = ev.drift_rows(shifted, reference, psi_threshold=0.2)
    assert [r["label"] for r in rows] == LABELS
    assert rows[0]["drifted"] is True and rows[1]["drifted"] is False
    for j, row in enumerate(rows):
        ref_s = reference.scores[:, j].astype(np.float64)
        cur_s = scores_of(shifted_preds, LABELS[j])
        assert row["psi"] == pytest.approx(drift.psi(ref_s, cur_s), abs=1e-12)
        ks = stats.ks_2samp(ref_s, cur_s)
        assert row["ks"] == pytest.approx(ks.statistic, abs=1e-12)
        assert row["ks_pvalue"] == pytest.approx(ks.pvalue, rel=1e-9)
        assert row["positive_rate"] == pytest.approx(np.mean(cur_s >= THRESHOLDS[j]))
        assert row["reference_positive_rate"] == pytest.approx(np.mean(ref_s >= THRESHOLDS[j]))
    # a looser threshold on PSI alone does not flag the unshifted run either way
    assert rows[0]["psi"] > 0.2 > calm[0]["psi"]
    report = ev.build_report(shifted, None, 0, reference=reference)
    assert report.drift is not None and report.drift[0]["drifted"] is True
    assert report.plots["effusion"]["reference_histogram"]["counts"] == \
        reference.stats[0].histogram(ev.PLOT_BINS)["counts"]
    assert ev.result_metrics(report)["effusion"]["drifted"] is True


def test_compare_is_a_paired_auroc_difference_on_shared_images() -> None:
    preds, keys = make_run(20, n_patients=100, unknown=0.0)
    ids = preds.column("image_id").to_pylist()
    # the other model scored 3/4 of the images, in another order, with noisier scores
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(ids), size=len(ids) * 3 // 4, replace=False))[::-1]
    other_tab = preds.take(pa.array(pick))
    for lab in LABELS:
        noisy = np.clip(scores_of(other_tab, lab) + rng.normal(scale=0.3, size=len(pick)), 0, 1)
        other_tab = other_tab.set_column(other_tab.column_names.index(f"score_{lab}"),
                                         f"score_{lab}", pa.array(noisy, pa.float32()))
    report = report_for(preds, keys, n_boot=300, compare=load(other_tab))
    assert report.compare is not None
    known, y_all = truth_of(preds)
    for j, lab in enumerate(LABELS):
        row = report.compare[j]
        y = y_all[pick, j]
        a = scores_of(preds, lab)[pick]
        b = scores_of(other_tab, lab)
        assert row["paired_images"] == len(pick)
        assert row["auroc"] == pytest.approx(skm.roc_auc_score(y, a), abs=1e-6)
        assert row["compare_auroc"] == pytest.approx(skm.roc_auc_score(y, b), abs=1e-6)
        assert row["auroc_diff"] == pytest.approx(row["auroc"] - row["compare_auroc"])
        assert row["auroc_diff_lo"] <= row["auroc_diff"] <= row["auroc_diff_hi"]
        assert row["auroc_diff"] > 0  # noise only hurts


def test_top_images_highest_first_ties_by_id() -> None:
    preds = pa.table({"image_id": ["c", "a", "b", "d"],
                      "true_labels": pa.array([None] * 4, pa.list_(pa.string())),
                      "score_effusion": pa.array([0.9, 0.9, 0.1, 0.5], pa.float32()),
                      "score_nodule": pa.array([0.1, 0.2, 0.3, 0.4], pa.float32())})
    run = load(preds, n_files=2)
    picks = rd.top_images(run, 2)
    named = [(LABELS[j], rank, run.image_id[row]) for j, rank, row in picks]
    assert named == [("effusion", 1, "a"), ("effusion", 2, "c"),
                     ("nodule", 1, "d"), ("nodule", 2, "b")]


def test_prediction_files_map_back_to_their_shards_and_heatmap_paths_are_safe() -> None:
    from medray.cluster.store import layout

    stem = layout.shard_stem("datasets/cxr/2/shards/part-00003.parquet")
    for date_dir in ("", "date=2026-03-01/"):
        assert layout.prediction_stem(layout.run_predictions(date_dir, stem)) == stem
    assert layout.run_report_heatmap("r1", "Pleural Effusion/x", 3, "ab" * 20) == \
        "runs/r1/report/heatmaps/Pleural_Effusion_x/03-abababababababab.png"
    assert layout.run_report_table("r1", "drift") == "runs/r1/report/drift.parquet"
    assert layout.run_report_commit("r1") == "runs/r1/report/_COMMITTED.json"


# --------------------------------------------------------------------------- HTML


def _heatmap_pngs() -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for j, label in enumerate(LABELS):
        img = rng.integers(0, 255, size=(28, 28, 1)).astype(np.uint8)
        yy, xx = np.mgrid[0:28, 0:28]
        heat = np.exp(-((yy - 10 - 5 * j) ** 2 + (xx - 14) ** 2) / 30.0)
        out.append({"label": label, "rank": 1, "image_id": f"{label}-img", "score": 0.9,
                    "png": to_png(overlay(img, heat), 112)})
    return out


def full_document(with_truth: bool = True) -> dict:
    preds, keys = make_run(30, unknown=0.1 if with_truth else 1.0)
    ref = load(make_run(31, shift=1.0)[0])
    run = load(preds)
    groups, _ = rd.patient_groups(run.image_id, keys)
    report = ev.build_report(run, groups, 100, reference=ref,
                             compare=load(make_run(30)[0]) if with_truth else None)
    unit, note, _ = rd.ci_note(groups[run.known], "mem:1")
    summary = {"run_id": "run-a", "model": "m", "model_version": 1, "images": run.images,
               "with_truth": run.with_truth, "ci_unit": unit, "ci_note": note,
               "reference": "run-ref", "compare": "run-a" if with_truth else None,
               "drifted_labels": [r["label"] for r in report.drift or [] if r["drifted"]]}
    return report_html.document(summary, report.per_label, report.plots, report.drift,
                                report.compare, _heatmap_pngs())


def test_html_is_self_contained() -> None:
    page = report_html.render(full_document())
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    srcs = re.findall(r'src="([^"]+)"', page)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    # 2 labels x (ROC, PR, reliability, histogram) + 2 heatmaps
    assert sum(s.startswith("data:image/svg+xml") for s in srcs) == 8
    assert sum(s.startswith("data:image/png") for s in srcs) == 2
    assert not re.search(r"(href|src)=\"https?:", page)
    assert "DRIFTED" in page  # the shifted label is flagged in the drift table


def test_html_without_ground_truth_has_histograms_only() -> None:
    doc = full_document(with_truth=False)
    page = report_html.render(doc)
    srcs = re.findall(r'src="(data:image/svg\+xml[^"]+)"', page)
    assert len(srcs) == 2  # one score histogram per label, no ROC/PR/reliability
    assert "no ground truth" in page


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    return {w: i.naturalWidth, h: i.naturalHeight, complete: i.complete, alt: i.alt,
            x: r.left, y: r.top, cw: r.width, ch: r.height};
  });
  document.body.setAttribute('data-probe', JSON.stringify(imgs));
});
</script>"""


def _browser(binary: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
           f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,2400", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp)})


def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary on PATH: install Debian's `chromium` package "
                    "(apt-get install -y chromium) to run the render test")
    page = report_html.render(full_document())
    report = tmp_path / "report.html"
    report.write_text(page)
    # A probing copy: the report itself carries no scripts.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE + "</body>"))
    dom = _browser(binary, tmp_path, "--virtual-time-budget=10000", "--dump-dom",
                   probe.as_uri())
    found = re.search(r'data-probe="([^"]*)"', dom.stdout)
    assert found, f"probe did not run; stderr: {dom.stderr[-2000:]}"
    import html as html_mod

    imgs = json.loads(html_mod.unescape(found.group(1)))
    assert len(imgs) == page.count("<img ") == 10
    broken = [i["alt"] for i in imgs if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert not broken, f"images that did not load: {broken}"

    shot = tmp_path / "shot.png"
    proc = _browser(binary, tmp_path, f"--screenshot={shot}", report.as_uri())
    assert shot.exists(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1200)
    in_view = [i for i in imgs if i["y"] >= 0 and i["y"] + i["ch"] <= pixels.shape[0]
               and i["x"] + i["cw"] <= pixels.shape[1]]
    plots = [i for i in in_view if i["alt"].startswith(("ROC", "PR", "reliability", "score"))]
    assert len(plots) >= 4, f"expected a label's four plots in the first screen: {in_view}"
    for i in in_view:
        x, y, w, h = (int(round(i[k])) for k in ("x", "y", "cw", "ch"))
        region = pixels[y + 2:y + h - 2, x + 2:x + w - 2]
        # drawn axes, curves and labels: far from a flat (blank or failed) region
        assert region.std() > 10, f"{i['alt']} looks blank (std {region.std():.1f})"
        assert (region < 128).mean() > 0.005, f"{i['alt']} has almost no dark pixels"
    # the page around the plots is white, so the check above measures the plots themselves
    assert np.median(pixels) > 240


# ----------------------------------------------------------------------- issue 15 additions
def _keys_with_attributes(keys: pa.Table, seed: int = 0) -> pa.Table:
    """The report's attribute read: metadata JSON per image (age and sex per patient, view
    per image), as remote.read_keys builds it."""
    rng = np.random.default_rng(seed)
    patients = keys.column("patient_key").to_pylist()
    ages = {p: int(rng.integers(1, 95)) for p in set(patients)}
    sexes = {p: str(rng.choice(["M", "F"])) for p in set(patients)}
    attrs = [rd.attribute_json({"metadata": json.dumps({"view_position": "PA" if i % 2 else
                                                        "AP"}),
                                "Patient Age": ages[p], "Patient Gender": sexes[p]})
             for i, p in enumerate(patients)]
    return keys.append_column("attributes", pa.array(attrs, pa.string()))


def test_operating_points_subgroups_tables_and_page():
    preds, keys = make_run(21)
    keys = _keys_with_attributes(keys)
    run = load(preds)
    groups, _ = rd.patient_groups(run.image_id, keys)
    attributes = rd.attributes_for(run.image_id, keys, None)  # the usual ones it has
    assert set(attributes) == {"Patient Age", "Patient Gender", "view_position"}
    points = [{"label": "effusion", "rule": "youden", "threshold": 0.4137, "primary": True},
              {"label": "effusion", "rule": "sensitivity=0.9", "threshold": 0.3,
               "primary": False},
              {"label": "nodule", "rule": "youden", "threshold": 0.6291, "primary": True}]
    report = ev.build_report(run, groups, 100, ["model card"] * 2, points=points,
                             attributes=attributes)
    known, y = truth_of(preds)
    s = scores_of(preds, "effusion")
    for row in (r for r in report.operating if r["label"] == "effusion"):
        pred = s[known] >= row["threshold"]
        assert row["sensitivity"] == pytest.approx(skm.recall_score(y[known, 0], pred))
        assert row["npv"] == pytest.approx(np.mean(y[known, 0][~pred] == 0))
        assert row["f1_lo"] <= row["f1"] <= row["f1_hi"]
    assert [(r["label"], r["rule"]) for r in report.operating] == [
        (p["label"], p["rule"]) for p in points]
    assert {r["attribute"] for r in report.subgroups} == set(attributes)
    assert len(report.gaps) == len(LABELS) * len(attributes) * 3
    for r in report.per_label:
        assert r["ece_lo"] <= r["ece"] <= r["ece_hi"]
    # every table writes with its fixed types, the page renders the new sections
    for rows in (report.operating, report.subgroups, report.gaps):
        report_tables.table(rows)
    summary = {"run_id": "r", "calibration": "temperature scaling", "flagged_gaps": 1,
               "subgroup_attributes": list(attributes),
               "heatmaps_note": "no heatmaps: <because>"}
    report_tables.table([summary])
    from medray.workers.model_card import ModelCard

    card = ModelCard(name="m", labels=LABELS, multi_label=True, input_size=8, channels=1,
                     arch="small_cnn", version=2).to_dict()
    page = report_html.render(report_html.document(
        summary, report.per_label, report.plots, None, None, [], operating=report.operating,
        subgroups=report.subgroups, gaps=report.gaps, card=card))
    assert "<h2>Operating points</h2>" in page and "<h2>Subgroups</h2>" in page
    assert "<h2>Model card: m:2</h2>" in page
    assert "no heatmaps: &lt;because&gt;" in page  # the note, escaped, once per label
    assert page.count("no heatmaps: &lt;because&gt;") == len(LABELS)


def test_asking_for_an_attribute_the_dataset_lacks_names_those_it_has():
    preds, keys = make_run(22)
    run = load(preds)
    with pytest.raises(rd.InputError, match="no attribute 'Weight'.*Patient Age"):
        rd.attributes_for(run.image_id, _keys_with_attributes(keys), ["Weight"])
    with pytest.raises(rd.InputError, match="keeps no patient attributes"):
        rd.attributes_for(run.image_id, keys, ["Patient Age"])
    assert rd.attributes_for(run.image_id, keys, None) == {}


def test_patient_keys_that_are_null_count_the_image_as_its_own_unit():
    preds, keys = make_run(23, n_patients=4, per_patient=2)
    run = load(preds)
    nulls = keys.set_column(1, "patient_key",
                            pa.array([None] + keys.column("patient_key").to_pylist()[1:]))
    groups, found = rd.patient_groups(run.image_id, nulls)
    first = keys.column("image_id")[0].as_py()
    kept = list(run.image_id)
    if first in kept:
        assert groups[kept.index(first)] == f"image:{first}"
    assert found == sum(1 for g in groups if g.startswith("patient:"))
    assert not any(g == "patient:None" for g in groups)
