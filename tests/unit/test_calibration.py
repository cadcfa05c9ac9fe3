"""Calibration (workers/calibration.py), operating points (workers/operating_points.py) and
the ECE interval (workers/bootstrap.ece_ci): known temperatures recovered from synthetic
logits, ECE against a direct computation, rules that hit their targets on validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from medray.workers import bootstrap, calibration, metrics
from medray.workers import operating_points as op
from medray.workers.errors import ConfigError


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ temperature scaling
@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_softmax_temperature_recovers_the_one_that_made_the_labels(t_true):
    """Labels drawn from softmax(z / T): the model's scores softmax(z) are miscalibrated by
    exactly T, and the fit must find it (maximum likelihood is consistent)."""
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(40_000, 3))
    truth = _softmax(z / t_true)
    drawn = np.array([rng.choice(3, p=p) for p in truth])
    y = np.eye(3)[drawn]
    t = calibration.fit(_softmax(z), y, ["a", "b", "c"], multi_label=False)
    assert set(t) == {"a", "b", "c"} and len(set(t.values())) == 1  # one shared temperature
    assert t["a"] == pytest.approx(t_true, rel=0.04)


def test_sigmoid_temperature_per_label():
    rng = np.random.default_rng(1)
    temps = [0.7, 1.0, 3.0]
    z = rng.normal(scale=4.0, size=(30_000, 3))
    y = (rng.random(z.shape) < 1 / (1 + np.exp(-z / np.array(temps)))).astype(float)
    raw = 1 / (1 + np.exp(-z))
    fitted = calibration.fit(raw, y, ["x", "y", "z"], multi_label=True)
    for label, t_true in zip("xyz", temps, strict=True):
        assert fitted[label] == pytest.approx(t_true, rel=0.05)


def test_fit_minimises_the_likelihood():
    """The fitted T beats its neighbours on the likelihood it minimises."""
    rng = np.random.default_rng(2)
    z = rng.normal(scale=2.0, size=(2000, 2))
    y = np.eye(2)[(rng.random(2000) < _softmax(z / 1.7)[:, 1]).astype(int)]
    raw = _softmax(z)
    t = calibration.fit(raw, y, ["n", "p"], False)["n"]
    best = calibration.nll(y, calibration.apply(raw, [t, t], False), False)
    for other in (t * 0.9, t * 1.1):
        assert best < calibration.nll(y, calibration.apply(raw, [other, other], False), False)


def test_apply_keeps_ranking_and_nan_rows():
    rng = np.random.default_rng(3)
    raw = rng.random((500, 2)).astype(np.float32)
    raw[7] = np.nan
    out = calibration.apply(raw, [2.0, 0.5], multi_label=True)
    assert out.dtype == np.float32 and np.isnan(out[7]).all()
    ok = np.isfinite(raw).all(axis=1)
    for j in range(2):  # temperature scaling never reorders a label's scores
        assert (np.argsort(raw[ok, j], kind="stable") ==
                np.argsort(out[ok, j], kind="stable")).all()
    np.testing.assert_allclose(calibration.apply(raw[ok], [1.0, 1.0], True), raw[ok], atol=1e-6)


def test_a_label_with_one_class_keeps_temperature_one():
    raw = np.array([[0.9, 0.2], [0.8, 0.7], [0.6, 0.1]])
    y = np.array([[1, 0], [1, 1], [1, 0]], float)
    assert calibration.fit(raw, y, ["all", "mixed"], True)["all"] == 1.0


def test_calibrate_reports_ece_before_and_after_and_lowers_it():
    rng = np.random.default_rng(4)
    z = rng.normal(scale=3.0, size=(5000, 2))
    y = np.eye(2)[(rng.random(5000) < _softmax(z / 3.0)[:, 1]).astype(int)]
    card, after = calibration.calibrate(_softmax(z), y, ["n", "p"], False, "val")
    assert card["fitted_on"] == "val" and card["images"] == 5000 and card["shared"]
    assert card["ece_after"]["p"] < 0.3 * card["ece_before"]["p"]
    assert card["nll_after"] < card["nll_before"]
    assert card["ece_after"]["p"] == pytest.approx(metrics.calibration(y[:, 1], after[:, 1])["ece"])


# ------------------------------------------------------------------------------ ECE
def _ece_direct(y: np.ndarray, s: np.ndarray, bins: int = 10) -> float:
    """ECE the textbook way: loop over bins [k/B, (k+1)/B), the last one closed."""
    total = 0.0
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        inside = (s >= lo) & ((s < hi) if k < bins - 1 else (s <= hi))
        if inside.any():
            total += inside.sum() / len(s) * abs(y[inside].mean() - s[inside].mean())
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_equals_a_direct_computation(seed):
    rng = np.random.default_rng(seed)
    s = rng.random(3000) ** 2
    s[:10] = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0, 0.35, 0.99]  # edges land in their bin
    y = (rng.random(3000) < s ** 0.8).astype(int)
    assert metrics.calibration(y, s)["ece"] == pytest.approx(_ece_direct(y, s), abs=1e-12)
    ece = calibration.ece(y[:, None], s[:, None], ["l"])["l"]
    assert ece == pytest.approx(_ece_direct(y, s), abs=1e-12)


def test_ece_interval_matches_resampling_by_hand():
    """The matrix-product bootstrap equals drawing patients and recomputing ECE directly."""
    rng = np.random.default_rng(5)
    n = 300
    g = rng.integers(0, 80, n)
    s = rng.random(n)
    y = (rng.random(n) < s).astype(int)
    lo, hi = bootstrap.ece_ci(y, s, g, n_boot=200, seed=9)
    units, n_units = bootstrap.units_of(g, n)
    values = []
    for counts in bootstrap.resample_counts(n_units, 200, seed=9):
        for row in counts:
            w = row[units]
            idx = np.repeat(np.arange(n), w.astype(int))
            values.append(_ece_direct(y[idx], s[idx]))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), abs=1e-12)
    point = metrics.calibration(y, s)["ece"]
    assert lo < point < hi


def test_ece_interval_is_nan_without_rows_or_resamples():
    assert all(math.isnan(v) for v in bootstrap.ece_ci(np.zeros(0), np.zeros(0), None, 100))
    assert all(math.isnan(v) for v in bootstrap.ece_ci(np.ones(3), np.ones(3), None, 0))


# -------------------------------------------------------------------- operating points
def _val(seed: int = 0, n: int = 700) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.6 * y)))
    return y, s


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_sensitivity_rule_hits_its_target_with_the_best_specificity(target, seed):
    y, s = _val(seed)
    (rule,) = op.parse(f"sensitivity={target}")
    t = op.threshold(y.astype(bool), s, rule)
    at = metrics.threshold_metrics(y, s, t)
    assert at["sensitivity"] >= target
    # the observed score just above t loses the target: t is the highest that keeps it
    above = s[s > t]
    if above.size > 1:
        assert metrics.threshold_metrics(y, s, np.sort(above)[1])["sensitivity"] < target
    # t lies strictly between two observed scores, so noise in the last bits changes nothing
    assert not np.any(np.isclose(s, t, rtol=0, atol=1e-9))
    assert at["specificity"] == pytest.approx(
        max(1 - f for f, r in zip(*skm.roc_curve(y, s, drop_intermediate=False)[:2],
                                  strict=True) if r >= target))


@pytest.mark.parametrize("target", [0.5, 0.9, 0.99])
def test_specificity_rule_hits_its_target_with_the_best_sensitivity(target):
    y, s = _val(3)
    (rule,) = op.parse(f"specificity={target}")
    t = op.threshold(y.astype(bool), s, rule)
    at = metrics.threshold_metrics(y, s, t)
    assert at["specificity"] >= target
    below = s[s < t]
    if below.size:
        assert metrics.threshold_metrics(y, s, below.max())["specificity"] < target
    assert not np.any(np.isclose(s, t, rtol=0, atol=1e-9))


def test_exact_target_counts_as_reached():
    """10 negatives: specificity 0.9 is 9 of 10, reached exactly despite 1 - 0.9 != 0.1."""
    y = np.r_[np.zeros(10), np.ones(5)].astype(bool)
    s = np.r_[np.arange(10) / 20, 0.6, 0.7, 0.8, 0.9, 0.95]
    t = op.threshold(y, s, op.parse("specificity=0.9")[0])
    assert t == pytest.approx(0.425) and metrics.threshold_metrics(y, s, t)["specificity"] == 0.9
    # the highest score is a negative: only calling nothing positive keeps specificity 1.0
    top = op.threshold(y, np.r_[np.arange(9) / 20, 0.99, 0.6, 0.7, 0.8, 0.9, 0.95],
                       op.parse("specificity=1.0")[0])
    assert top == pytest.approx(0.995)


def test_youden_rule_is_the_youden_threshold():
    y, s = _val(4)
    t = op.threshold(y.astype(bool), s, op.parse("youden")[0])
    fpr, tpr, thr = skm.roc_curve(y, s)
    best = thr[np.argmax(tpr - fpr)]
    assert t < best and not np.any((s >= t) & (s < best))  # the same calls as sklearn's point
    at = metrics.threshold_metrics(y, s, t)
    assert at["sensitivity"] - (1 - at["specificity"]) == pytest.approx(np.max(tpr - fpr))


def test_choose_gives_every_label_its_rules_primary_first():
    y0, s0 = _val(5)
    y1, s1 = _val(6)
    y = np.c_[y0, y1]
    s = np.c_[s0, s1]
    rules = op.parse("youden, b:sensitivity=0.95, specificity=0.9")
    points = op.choose(y, s, ["a", "b"], rules, "val")
    assert [(p["label"], p["rule"], p["primary"]) for p in points] == [
        ("a", "youden", True), ("a", "specificity=0.9", False),
        ("b", "youden", True), ("b", "sensitivity=0.95", False),
        ("b", "specificity=0.9", False)]
    b95 = next(p for p in points if p["rule"] == "sensitivity=0.95")
    assert b95["val_sensitivity"] >= 0.95
    assert op.primary_thresholds(points) == {"a": points[0]["threshold"],
                                             "b": points[2]["threshold"]}


def test_a_label_with_one_class_in_validation_gets_half_and_says_so():
    y = np.c_[np.ones(20), np.r_[np.zeros(10), np.ones(10)]]
    s = np.random.default_rng(0).random((20, 2))
    points = op.choose(y, s, ["all", "mixed"], op.parse("youden"), "val")
    assert points[0]["threshold"] == 0.5 and "not placed" in points[0]["rule"]
    assert "not placed" not in points[1]["rule"]


@pytest.mark.parametrize("bad", ["", "youdn", "sensitivity", "sensitivity=1.5",
                                 "specificity=x", "f1"])
def test_bad_rules_name_the_fix(bad):
    with pytest.raises(ConfigError, match="--operating-point"):
        op.parse(bad)


def test_a_rule_for_an_unknown_label_is_refused():
    with pytest.raises(ConfigError, match="no label 'Mass'"):
        op.check_labels(op.parse("Mass:youden"), ["Effusion"])
