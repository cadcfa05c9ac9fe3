"""The metric modules (workers/metrics.py, bootstrap.py, drift.py, streaming.py) against
scikit-learn, hand computations and simulations with known truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from medray.workers import bootstrap, drift
from medray.workers import metrics as m
from medray.workers.bootstrap import bootstrap_ci, paired_bootstrap_diff
from medray.workers.errors import InputError
from medray.workers.streaming import StreamingLabelStats

SEEDS = [0, 1, 2]
SIZES = [2, 3, 7, 50, 2000]


def _sample(seed: int, n: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    """Random labels with both classes present; tied scores take only a few distinct values."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    s = rng.random(n) + 0.3 * y
    if tied:
        s = np.round(s * 4) / 4
    return y, s


def _binormal(rng: np.random.Generator, n_per_class: int, d: float) -> tuple[np.ndarray, ...]:
    """Negatives ~ N(0, 1), positives ~ N(d, 1): true AUROC = Phi(d / sqrt 2)."""
    y = np.r_[np.zeros(n_per_class, int), np.ones(n_per_class, int)]
    s = rng.normal(size=2 * n_per_class) + d * y
    return y, s


def _nan_equal(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------- vs scikit-learn


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_and_auprc_match_sklearn(seed: int, n: int, tied: bool) -> None:
    y, s = _sample(seed, n, tied)
    assert m.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), rel=1e-6)
    assert m.auprc(y, s) == pytest.approx(skm.average_precision_score(y, s), rel=1e-6)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_curves_match_sklearn(n: int, tied: bool) -> None:
    y, s = _sample(7, n, tied)
    fpr, tpr, thr = m.roc_curve(y, s)
    ref = skm.roc_curve(y, s, drop_intermediate=False)
    for got, want in zip((fpr, tpr, thr), ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    prec, rec, thr = m.pr_curve(y, s)
    ref = skm.precision_recall_curve(y, s)
    for got, want in zip((prec, rec, thr), ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_auroc_of_bool_labels_and_lists() -> None:
    y, s = [False, False, True, True], [0.1, 0.4, 0.35, 0.8]
    assert m.auroc(y, s) == pytest.approx(0.75)
    assert m.auprc(np.array(y, dtype=float), s) == pytest.approx(skm.average_precision_score(y, s))


def test_undefined_discrimination_is_nan() -> None:
    assert math.isnan(m.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(m.auroc([0, 0], [0.1, 0.2]))
    assert math.isnan(m.auroc([], []))
    assert math.isnan(m.auprc([0, 0], [0.1, 0.2]))
    assert m.auprc([1, 1], [0.1, 0.2]) == 1.0  # defined, as in sklearn
    fpr, tpr, _ = m.roc_curve([1, 1], [0.1, 0.2])
    assert np.isnan(fpr).all() and np.isfinite(tpr).all()


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", [2, 7, 50, 2000])
@pytest.mark.parametrize("seed", SEEDS)
def test_threshold_metrics_match_sklearn(seed: int, n: int, tied: bool) -> None:
    y, s = _sample(seed, n, tied)
    for t in [-1.0, float(np.median(s)), 0.5, float(s.max()), float(s.max()) + 1]:
        got = m.threshold_metrics(y, s, t)
        pred = (s >= t).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (tp, fp, tn, fn)
        kw = {"zero_division": np.nan}
        want = {
            "sensitivity": skm.recall_score(y, pred, **kw),
            "specificity": skm.recall_score(y, pred, pos_label=0, **kw),
            "ppv": skm.precision_score(y, pred, **kw),
            "npv": skm.precision_score(y, pred, pos_label=0, **kw),
            "accuracy": skm.accuracy_score(y, pred),
        }
        for key, value in want.items():
            assert _nan_equal(got[key], float(value)), (t, key, got[key], value)
        if tp + fp + fn:
            assert got["f1"] == pytest.approx(skm.f1_score(y, pred), rel=1e-12)


def test_threshold_metrics_undefined_rates_are_nan() -> None:
    got = m.threshold_metrics([0, 0, 0], [0.1, 0.2, 0.3], threshold=0.5)
    assert (got["tp"], got["fp"], got["tn"], got["fn"]) == (0, 0, 3, 0)
    for key in ("sensitivity", "ppv", "f1"):
        assert math.isnan(got[key])
    assert got["specificity"] == 1.0 and got["npv"] == 1.0 and got["accuracy"] == 1.0
    assert set(got) == {
        "tp",
        "fp",
        "tn",
        "fn",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
        "accuracy",
    }
    empty = m.threshold_metrics([], [], 0.5)
    assert empty["tp"] == 0 and math.isnan(empty["accuracy"])


@pytest.mark.parametrize("seed", SEEDS)
def test_best_threshold_is_the_brute_force_optimum(seed: int) -> None:
    y, s = _sample(seed, 300, tied=seed == 1)
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    t = m.best_threshold(y, s, "youden")
    j = tpr - fpr
    assert t == thr[int(np.argmax(j))]
    at = m.threshold_metrics(y, s, t)
    assert at["sensitivity"] + at["specificity"] - 1 == pytest.approx(j.max())

    t = m.best_threshold(y, s, "f1")
    best = max(skm.f1_score(y, (s >= c).astype(int)) for c in np.unique(s))
    assert m.threshold_metrics(y, s, t)["f1"] == pytest.approx(best, rel=1e-12)


def test_best_threshold_on_separable_data_is_lowest_positive() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.9])
    assert m.best_threshold(y, s, "youden") == 0.6
    assert m.best_threshold(y, s, "f1") == 0.6


def test_best_threshold_ties_go_to_the_higher_threshold() -> None:
    # Youden J is 0.5 at both 0.4 and 0.2: the stricter point (fewer false alarms) wins.
    y, s = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    assert m.best_threshold(y, s, "youden") == 0.4
    assert m.best_threshold(y, s, "f1") == 0.2


# --------------------------------------------------------------------------- calibration


def test_calibration_by_hand() -> None:
    y = np.array([0, 1, 0, 1, 1, 1])
    s = np.array([0.05, 0.15, 0.55, 0.6, 0.95, 1.0])
    cal = m.calibration(y, s, n_bins=2)
    lo_bin, hi_bin = cal["bins"]
    assert (lo_bin["lo"], lo_bin["hi"], hi_bin["lo"], hi_bin["hi"]) == (0.0, 0.5, 0.5, 1.0)
    assert lo_bin["count"] == 2 and hi_bin["count"] == 4  # 1.0 lands in the last bin
    assert lo_bin["mean_score"] == pytest.approx(0.10)
    assert lo_bin["frac_positive"] == pytest.approx(0.5)
    assert hi_bin["mean_score"] == pytest.approx(0.775)
    assert hi_bin["frac_positive"] == pytest.approx(0.75)
    assert cal["ece"] == pytest.approx((2 * 0.4 + 4 * 0.025) / 6)


def test_calibration_random_against_loop_and_empty_bins() -> None:
    rng = np.random.default_rng(3)
    s = rng.random(1000) ** 3  # most mass low: upper bins sparse
    y = (rng.random(1000) < s).astype(int)  # calibrated by construction
    cal = m.calibration(y, s, n_bins=10)
    ece = 0.0
    for k, b in enumerate(cal["bins"]):
        inside = (s >= k / 10) & ((s < (k + 1) / 10) | (k == 9))
        assert b["count"] == inside.sum()
        if inside.any():
            ece += inside.sum() * abs(y[inside].mean() - s[inside].mean())
    assert cal["ece"] == pytest.approx(ece / 1000, rel=1e-9)
    assert cal["ece"] < 0.05
    json.dumps(m.calibration([1], [0.5], n_bins=4))  # empty bins stay JSON-safe
    assert m.calibration([1], [0.5], n_bins=4)["bins"][0]["mean_score"] is None


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_separable_is_exactly_one() -> None:
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    s = np.r_[np.linspace(0, 0.4, 30), np.linspace(0.6, 1, 30)]
    assert bootstrap_ci(m.auroc, y, s, n_boot=200) == (1.0, 1.0, 1.0)
    assert bootstrap_ci(m.auprc, y, s, n_boot=200) == (1.0, 1.0, 1.0)


def test_bootstrap_covers_known_auroc_and_shrinks_with_n() -> None:
    truth = norm.cdf(1.0 / math.sqrt(2))
    rng = np.random.default_rng(11)
    widths = {}
    for n in (200, 2000):
        y, s = _binormal(rng, n, d=1.0)
        point, lo, hi = bootstrap_ci(m.auroc, y, s, n_boot=1000, seed=1)
        assert lo <= point <= hi
        assert lo < truth < hi
        widths[n] = hi - lo
    # Width scales like 1/sqrt(n): a 10x bigger sample is ~3.2x narrower.
    assert 2.2 < widths[200] / widths[2000] < 4.5


def test_bootstrap_coverage_and_width_are_near_nominal() -> None:
    truth = norm.cdf(1.0 / math.sqrt(2))
    rng = np.random.default_rng(5)
    covered, widths, points = 0, [], []
    for i in range(60):
        y, s = _binormal(rng, 150, d=1.0)
        point, lo, hi = bootstrap_ci(m.auroc, y, s, n_boot=400, seed=i)
        covered += lo < truth < hi
        widths.append(hi - lo)
        points.append(point)
    assert covered >= 51  # 95% nominal; P(covered < 51) ~ 1% for a correct interval
    # A 95% interval spans about 2 x 1.96 standard errors of the estimate across samples.
    assert 0.75 < np.mean(widths) / (3.92 * np.std(points, ddof=1)) < 1.3


def test_grouped_bootstrap_is_wider_when_images_of_a_patient_agree() -> None:
    rng = np.random.default_rng(2)
    y1, s1 = _binormal(rng, 100, d=1.0)
    patient = np.repeat(np.arange(200), 5)
    y5, s5 = np.repeat(y1, 5), np.repeat(s1, 5)
    _, lo_r, hi_r = bootstrap_ci(m.auroc, y5, s5, n_boot=1000)
    _, lo_g, hi_g = bootstrap_ci(m.auroc, y5, s5, groups=patient, n_boot=1000)
    _, lo_1, hi_1 = bootstrap_ci(m.auroc, y1, s1, n_boot=1000)
    assert (hi_g - lo_g) > 1.6 * (hi_r - lo_r)  # sqrt(5) ~ 2.2 expected
    # Copies carry no new information: grouped CI on copies ~ row CI on one row per patient.
    assert (hi_g - lo_g) == pytest.approx(hi_1 - lo_1, rel=0.05)


def test_grouped_bootstrap_brings_all_rows_of_a_patient() -> None:
    # Patient p0: two positives at 0.9; p1: a negative at 0.1; p2: a negative at 0.95.
    # Drawing k0, k1, k2 copies of whole patients (k0 + k1 + k2 = 3) gives AUROC
    # k1 / (k1 + k2) with k1 + k2 <= 2 whenever it is defined: only 0, 1/2 or 1.
    # Drawing rows instead can pick one positive and three negatives: 1/3 or 2/3 appear.
    y = np.array([1, 1, 0, 0])
    s = np.array([0.9, 0.9, 0.1, 0.95])
    groups = np.array(["p0", "p0", "p1", "p2"])

    def finite_values(g: np.ndarray | None) -> set[float]:
        vals = bootstrap._bootstrap_values(m.auroc, y == 1, [s], g, 400, 4)[0]
        return {round(float(v), 9) for v in vals[np.isfinite(vals)]}

    assert finite_values(groups) == {0.0, 0.5, 1.0}
    assert {0.333333333, 0.666666667} <= finite_values(None)
    fast = bootstrap_ci(m.auroc, y, s, groups=groups, n_boot=300, seed=4)
    slow = bootstrap_ci(lambda a, b: m.auroc(a, b), y, s, groups=groups, n_boot=300, seed=4)
    assert fast == slow


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("metric", [m.auroc, m.auprc])
def test_vectorised_bootstrap_equals_per_resample_calls(metric, grouped: bool) -> None:
    y, s = _sample(9, 400, tied=True)
    groups = np.arange(400) // 3 if grouped else None
    fast = bootstrap_ci(metric, y, s, groups=groups, n_boot=300, seed=3)
    slow = bootstrap_ci(lambda a, b: metric(a, b), y, s, groups=groups, n_boot=300, seed=3)
    assert fast == pytest.approx(slow, rel=1e-12)


def test_vectorised_bootstrap_equals_sklearn_per_resample() -> None:
    y, s = _sample(4, 300, tied=False)
    ours = bootstrap_ci(m.auroc, y, s, n_boot=200, seed=8)
    ref = bootstrap_ci(skm.roc_auc_score, y, s, n_boot=200, seed=8)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_bootstrap_skips_one_class_resamples() -> None:
    y = np.array([0, 1, 0, 1, 0])
    s = np.array([0.2, 0.7, 0.4, 0.3, 0.1])
    vals = bootstrap._bootstrap_values(m.auroc, y == 1, [s], None, 500, 0)[0]
    assert np.isnan(vals).sum() > 10  # tiny sample: many resamples miss a class
    point, lo, hi = bootstrap_ci(m.auroc, y, s, n_boot=500)
    finite = vals[np.isfinite(vals)]
    assert (lo, hi) == tuple(np.quantile(finite, [0.025, 0.975]))
    assert point == pytest.approx(5 / 6)
    assert all(math.isnan(v) for v in bootstrap_ci(lambda a, b: math.nan, y, s, n_boot=10))


def test_bootstrap_is_reproducible_by_seed() -> None:
    y, s = _sample(1, 200, tied=False)
    assert bootstrap_ci(m.auroc, y, s, seed=3) == bootstrap_ci(m.auroc, y, s, seed=3)
    assert bootstrap_ci(m.auroc, y, s, seed=3) != bootstrap_ci(m.auroc, y, s, seed=4)


def test_bootstrap_accepts_any_metric() -> None:
    y, s = _sample(2, 300, tied=False)

    def f1_at_half(a: np.ndarray, b: np.ndarray) -> float:
        return m.threshold_metrics(a, b, 0.5)["f1"]

    point, lo, hi = bootstrap_ci(f1_at_half, y, s, n_boot=200)
    assert point == m.threshold_metrics(y, s, 0.5)["f1"]
    assert lo < point < hi


# --------------------------------------------------------------------------- paired comparison


def test_paired_identical_models() -> None:
    y, s = _sample(5, 300, tied=True)
    out = paired_bootstrap_diff(m.auroc, y, s, s.copy(), n_boot=300)
    assert out["diff"] == 0.0 and out["lo"] == 0.0 and out["hi"] == 0.0
    assert out["p_value"] == 1.0
    assert out["a"] == out["b"] == m.auroc(y, s)


@pytest.mark.parametrize("grouped", [False, True])
def test_paired_clearly_better_model(grouped: bool) -> None:
    rng = np.random.default_rng(6)
    y, good = _binormal(rng, 300, d=2.0)
    worse = good + rng.normal(scale=2.0, size=good.size)
    groups = np.arange(y.size) // 2 if grouped else None
    out = paired_bootstrap_diff(m.auroc, y, good, worse, groups=groups, n_boot=500)
    assert out["diff"] == pytest.approx(m.auroc(y, good) - m.auroc(y, worse))
    assert 0 < out["lo"] < out["diff"] < out["hi"]
    assert out["p_value"] == pytest.approx(2 / 501)
    flipped = paired_bootstrap_diff(m.auroc, y, worse, good, groups=groups, n_boot=500)
    assert flipped["hi"] < 0 and flipped["lo"] == pytest.approx(-out["hi"])


def test_paired_is_narrower_than_unpaired() -> None:
    rng = np.random.default_rng(8)
    y, a = _binormal(rng, 300, d=1.0)
    b = a + rng.normal(scale=0.3, size=a.size)  # two similar models: errors correlate
    out = paired_bootstrap_diff(m.auroc, y, a, b, n_boot=500)
    _, lo_a, hi_a = bootstrap_ci(m.auroc, y, a, n_boot=500)
    assert out["hi"] - out["lo"] < 0.5 * (hi_a - lo_a)


# --------------------------------------------------------------------------- drift


def test_psi_by_hand() -> None:
    ref = np.arange(100.0)  # deciles: 10 values per bin
    cur = np.r_[np.zeros(50), np.full(50, 99.0)]  # half in the first bin, half in the last
    p, q = 0.1, 0.5
    expected = 2 * (q - p) * math.log(q / p) + 8 * (1e-4 - p) * math.log(1e-4 / p)
    assert drift.psi(ref, cur) == pytest.approx(expected, rel=1e-9)
    assert drift.psi(ref, ref) == 0.0


def test_same_distribution_is_not_drift() -> None:
    rng = np.random.default_rng(0)
    ref, cur = rng.normal(size=5000), rng.normal(size=5000)
    out = drift.drift_flags(ref, cur)
    assert out["psi"] < 0.02
    assert out["ks"] == pytest.approx(drift.ks(ref, cur)[0]) and out["ks_pvalue"] > 0.01
    assert out["drifted"] is False


def test_shift_of_one_sd_is_drift() -> None:
    rng = np.random.default_rng(1)
    ref, cur = rng.normal(size=5000), rng.normal(size=5000) + 1.0
    out = drift.drift_flags(ref, cur)
    assert out["psi"] > 0.5 and out["ks_pvalue"] < 1e-10
    assert out["drifted"] is True
    json.dumps(out)


def test_small_batches_from_same_distribution_rarely_flag() -> None:
    # PSI alone exceeds 0.2 by chance on 50 vs 50 values; the KS check keeps that quiet.
    rng = np.random.default_rng(2)
    results = [drift.drift_flags(rng.normal(size=50), rng.normal(size=50)) for _ in range(40)]
    assert sum(r["psi"] > 0.2 for r in results) >= 10
    assert sum(r["drifted"] for r in results) <= 2


def test_ks_known_value() -> None:
    stat, p = drift.ks([0.0, 1.0, 2.0], [10.0, 11.0])
    assert stat == 1.0 and 0 < p < 0.5


# --------------------------------------------------------------------------- streaming


def _stream_data(seed: int = 0, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * y - 1)))
    return y, s


def test_streaming_chunks_and_merge_equal_one_shot() -> None:
    y, s = _stream_data()
    whole = StreamingLabelStats()
    whole.update(y, s)
    whole.update(None, s[:500])
    parts = []
    for lo in range(0, y.size, 3000):
        part = StreamingLabelStats()
        part.update(y[lo : lo + 3000], s[lo : lo + 3000])
        parts.append(part)
    tail = StreamingLabelStats()
    tail.update(None, s[:250])
    tail.update(None, s[250:500])
    merged = tail
    for part in parts:
        merged = part.merge(merged)
    assert merged.histogram(1000) == whole.histogram(1000)
    assert merged.count == whole.count == y.size + 500
    assert merged.labelled == y.size
    assert merged.positives == whole.positives == int(y.sum())
    assert merged.mean_score == pytest.approx(np.r_[s, s[:500]].mean(), rel=1e-12)
    assert merged.auroc_approx() == whole.auroc_approx()
    assert parts[0].count == 3000  # merge left its inputs alone


def test_streaming_auroc_approx_close_to_exact() -> None:
    for seed in SEEDS:
        y, s = _stream_data(seed)
        st = StreamingLabelStats(n_bins=1000)
        st.update(y, s)
        exact = m.auroc(y, s)
        err = abs(st.auroc_approx() - exact)
        assert err < 1e-3
        assert err <= st.auroc_error_bound()
    coarse = StreamingLabelStats(n_bins=10)
    coarse.update(y, s)
    assert abs(coarse.auroc_approx() - exact) <= coarse.auroc_error_bound()
    assert abs(coarse.auroc_approx() - exact) > 1e-4  # bins do matter: the test can fail


def test_streaming_histogram_counts_every_row() -> None:
    y, s = _stream_data(1)
    s = np.r_[s, 0.0, 0.57, 0.5, 1.0]
    st = StreamingLabelStats()
    st.update(y, s[: y.size])
    st.update(None, s[y.size :])
    h = st.histogram(20)
    counts, edges = np.histogram(s, bins=20, range=(0.0, 1.0))  # 1.0 in the last bin, as ours
    assert h["counts"] == counts.tolist()
    np.testing.assert_allclose(h["edges"], edges)
    json.dumps(h)
    with pytest.raises(InputError):
        st.histogram(7)


def test_streaming_empty_and_mismatched() -> None:
    empty = StreamingLabelStats()
    assert empty.count == 0 and empty.labelled == 0 and math.isnan(empty.mean_score)
    assert math.isnan(empty.auroc_approx()) and math.isnan(empty.auroc_error_bound())
    assert empty.histogram(20)["counts"] == [0] * 20
    with pytest.raises(InputError):
        StreamingLabelStats(n_bins=200).merge(empty)  # different n_bins


# --------------------------------------------------------------------------- errors


def _calls(y, s):
    return [
        lambda: m.auroc(y, s),
        lambda: m.auprc(y, s),
        lambda: m.roc_curve(y, s),
        lambda: m.pr_curve(y, s),
        lambda: m.threshold_metrics(y, s, 0.5),
        lambda: m.best_threshold(y, s),
        lambda: m.calibration(y, s),
        lambda: bootstrap_ci(m.auroc, y, s, n_boot=5),
        lambda: paired_bootstrap_diff(m.auroc, y, s, s, n_boot=5),
        lambda: StreamingLabelStats().update(y, s),
    ]


BAD_INPUTS = {
    "mismatched lengths": ([0, 1, 0], [0.1, 0.2]),
    "nan score": ([0, 1, 0], [0.1, np.nan, 0.3]),
    "inf score": ([0, 1, 0], [0.1, np.inf, 0.3]),
    "label 2": ([0, 2, 1], [0.1, 0.2, 0.3]),
    "label nan": ([0, np.nan, 1], [0.1, 0.2, 0.3]),
    "string labels": (["no", "yes", "no"], [0.1, 0.2, 0.3]),
    "2-D scores": ([0, 1], [[0.1, 0.2], [0.3, 0.4]]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_input_error(case: str) -> None:
    y, s = BAD_INPUTS[case]
    for call in _calls(y, s):
        with pytest.raises(InputError):
            call()


def test_error_messages_say_what_is_wrong() -> None:
    with pytest.raises(InputError, match="3 rows but y_score has 2"):
        m.auroc([0, 1, 0], [0.1, 0.2])
    with pytest.raises(InputError, match="NaN"):
        m.auroc([0, 1], [0.1, np.nan])
    with pytest.raises(InputError, match=r"only 0 and 1, found \[2\]"):
        m.auroc([0, 2], [0.1, 0.2])


def test_other_invalid_arguments() -> None:
    y, s = [0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]
    with pytest.raises(InputError):
        m.best_threshold(y, s, method="accuracy")
    with pytest.raises(InputError):
        m.best_threshold([1, 1], [0.1, 0.2])
    with pytest.raises(InputError):
        m.calibration(y, [0.1, 1.2, 0.2, 0.8])
    with pytest.raises(InputError):
        StreamingLabelStats().update(None, [-0.1, 0.5])
    with pytest.raises(InputError):
        bootstrap_ci(m.auroc, y, s, groups=[1, 2])
    with pytest.raises(InputError):
        bootstrap_ci(m.auroc, y, s, groups=[1.0, np.nan, 2.0, 2.0])
    with pytest.raises(InputError):
        bootstrap_ci(m.auroc, y, s, alpha=1.5)
    with pytest.raises(InputError):
        bootstrap_ci(m.auroc, y, s, n_boot=0)
    with pytest.raises(InputError):
        m.threshold_metrics(y, s, float("nan"))
    with pytest.raises(InputError):
        drift.psi([], [0.1])
    with pytest.raises(InputError):
        drift.drift_flags([0.1, np.nan], [0.1])
    with pytest.raises(InputError):
        StreamingLabelStats(n_bins=0)
