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
from medray.workers.errors import ConfigError, InputError


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


# ------------------------------------------------------ temperature and bias, chosen
def _sigmoid_data(seed: int, t_true: float, b_true: float, n: int = 20_000):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(z / t_true + b_true)))).astype(float)
    return 1 / (1 + np.exp(-z)), y


@pytest.mark.parametrize(("t_true", "b_true"), [(2.0, 1.2), (0.6, -0.8)])
def test_sigmoid_temperature_and_bias_are_recovered_and_chosen(t_true, b_true):
    """Labels drawn from sigmoid(z / T + b): no temperature alone fits them, so cross-fitting
    keeps the bias, and the refit on all rows finds both (maximum likelihood is consistent)."""
    raw, y = _sigmoid_data(0, t_true, b_true)
    fitted = calibration.fit_forms(raw[:, None], y[:, None], ["x"], True, calibration.AUTO)
    assert fitted["form"]["x"] == calibration.WITH_BIAS
    assert fitted["temperature"]["x"] == pytest.approx(t_true, rel=0.05)
    assert fitted["bias"]["x"] == pytest.approx(b_true, abs=0.06)
    held = fitted["heldout_nll"]["x"]
    assert held[calibration.WITH_BIAS] < held[calibration.TEMPERATURE]


def _logit(p: float) -> float:
    return float(np.log(p / (1 - p)))


@pytest.mark.parametrize("multi_label", [True, False])
def test_balanced_bias_is_the_fit_at_equal_class_priors(multi_label):
    """Validation that keeps every positive and 30% of the negatives of a population where
    y ~ sigmoid(z / T + b): fitted as it is, the bias takes in the sampling (b + log(1 / 0.3));
    with the classes weighted equally, the fit is the population's at equal priors, b less the
    population's log-odds, whatever share of each class validation kept."""
    raw, y = _sigmoid_data(3, 1.6, 0.7, n=60_000)
    prevalence = y.mean()
    keep = (y == 1) | (np.random.default_rng(4).random(len(y)) < 0.3)
    raw, y = raw[keep], y[keep]
    scores = raw[:, None] if multi_label else np.stack([1 - raw, raw], axis=1)
    targets = y[:, None] if multi_label else np.stack([1 - y, y], axis=1)
    labels = ["x"] if multi_label else ["no", "x"]
    plain = calibration.fit_forms(scores, targets, labels, multi_label, calibration.WITH_BIAS)
    balanced = calibration.fit_forms(scores, targets, labels, multi_label, calibration.BALANCED)
    assert plain["bias"]["x"] == pytest.approx(0.7 + np.log(1 / 0.3), abs=0.08)
    assert balanced["form"]["x"] == calibration.BALANCED
    assert balanced["temperature"]["x"] == pytest.approx(1.6, rel=0.05)
    assert balanced["bias"]["x"] == pytest.approx(0.7 - _logit(prevalence), abs=0.08)
    card, after = calibration.calibrate(scores, targets, labels, multi_label, "val",
                                        calibration.BALANCED)
    assert card["asked"] == calibration.BALANCED
    assert card["bias"]["x"] == pytest.approx(balanced["bias"]["x"])
    # at equal priors: the mean score of each class, weighted equally, is one half
    col = after[:, -1]
    assert (col[y == 1].mean() + col[y == 0].mean()) / 2 == pytest.approx(0.5, abs=0.02)
    assert calibration.describe(card) == "temperature scaling with a class-balanced bias"


def test_balanced_weights_give_each_class_present_the_same_total():
    t = np.eye(3)[[0, 0, 0, 1, 2, 2]]
    w = calibration.balanced_weights(t)
    assert w.mean() == pytest.approx(1.0)
    assert [w[t[:, c] == 1].sum() for c in range(3)] == pytest.approx([2.0, 2.0, 2.0])
    w2 = calibration.balanced_weights(np.eye(3)[[0, 0, 1]])  # a class absent: two share it all
    assert list(w2) == pytest.approx([0.75, 0.75, 1.5])


def test_softmax_temperature_and_class_biases_are_recovered():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.0, size=(20_000, 3))
    b_true = np.array([0.0, 0.8, -0.5])
    truth = _softmax(z / 1.5 + b_true)
    y = np.eye(3)[[rng.choice(3, p=p) for p in truth]]
    fitted = calibration.fit_forms(_softmax(z), y, ["a", "b", "c"], False, calibration.AUTO)
    assert set(fitted["form"].values()) == {calibration.WITH_BIAS}
    assert len(set(fitted["temperature"].values())) == 1  # one shared temperature
    assert fitted["temperature"]["a"] == pytest.approx(1.5, rel=0.05)
    assert [fitted["bias"][k] for k in "abc"] == pytest.approx(list(b_true), abs=0.06)


def test_temperature_alone_is_chosen_when_a_bias_does_not_help():
    """Labels drawn from sigmoid(z / 2): the bias has nothing to fit. Cross-fitting can still
    favour it by chance (the margin is set for under 5% of such splits); over 40 splits it must
    keep temperature-only at least 36 times, and then with a bias of exactly 0."""
    kept = 0
    for seed in range(40):
        raw, y = _sigmoid_data(seed, 2.0, 0.0, n=1000)
        fitted = calibration.fit_forms(raw[:, None], y[:, None], ["x"], True, calibration.AUTO)
        if fitted["form"]["x"] == calibration.TEMPERATURE:
            kept += 1
            assert fitted["bias"]["x"] == 0.0
            assert fitted["temperature"]["x"] == calibration.fit(raw[:, None], y[:, None],
                                                                 ["x"], True)["x"]
    assert kept >= 36


def test_the_affine_fit_is_the_likelihood_minimum_and_never_above_temperature():
    raw, y = _sigmoid_data(2, 1.7, 0.9, n=2000)
    z2 = np.c_[np.zeros(len(raw)), np.log(raw) - np.log1p(-raw)]
    t2 = np.c_[1 - y, y]
    t_only = calibration.fit_softmax(z2, t2)
    temp, bias = calibration.fit_affine(z2, t2, t_only)

    def nll(t: float, b: float) -> float:
        return calibration.nll(y[:, None], calibration.apply(raw[:, None], [t], True, [b]), True)

    best = nll(temp, bias[1])
    assert best < nll(t_only, 0.0) < nll(1.0, 0.0)
    for dt, db in ((1.02, 0), (0.98, 0), (1, 0.02), (1, -0.02)):
        assert best < nll(temp * dt, bias[1] + db)


def test_calibrate_stores_the_form_and_applies_the_bias():
    raw, y = _sigmoid_data(3, 1.0, 1.5, n=5000)
    scores = np.c_[raw, 1 - raw]
    ys = np.c_[y, 1 - y]
    card, after = calibration.calibrate(scores, ys, ["p", "q"], True, "val", calibration.AUTO)
    assert card["form"] == {"p": calibration.WITH_BIAS, "q": calibration.WITH_BIAS}
    assert card["asked"] == calibration.AUTO and "cross-fitted" in card["selection"]
    assert card["bias"]["p"] == pytest.approx(1.5, abs=0.12)
    assert card["bias"]["q"] == pytest.approx(-card["bias"]["p"], abs=1e-6)  # the mirror label
    np.testing.assert_allclose(after, calibration.apply_card(scores, card, ["p", "q"], True))
    assert card["nll_after"] < card["nll_before"]
    assert card["ece_after"]["p"] < 0.3 * card["ece_before"]["p"]


def test_a_card_with_temperatures_only_scores_as_before():
    """Cards written before the bias existed: no ``bias`` key, the same scores as the plain
    temperature scaling they were fitted for."""
    rng = np.random.default_rng(6)
    raw = rng.random((300, 3)).astype(np.float32)
    old = {"method": calibration.METHOD, "fitted_on": "val",
           "temperature": {"a": 0.5, "b": 1.0, "c": 3.0}}
    assert calibration.biases(old, ["a", "b", "c"]) is None
    for multi in (True, False):
        np.testing.assert_array_equal(
            calibration.apply_card(raw, old, ["a", "b", "c"], multi),
            calibration.apply(raw, [0.5, 1.0, 3.0], multi))
    np.testing.assert_array_equal(calibration.apply_card(raw, {}, ["a", "b", "c"], True), raw)


def test_a_fitting_half_without_a_class_keeps_temperature_only():
    raw = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.85])
    y = np.array([1, 1, 1, 0, 1, 1], float)  # one negative: one fold has none to fit on
    fitted = calibration.fit_forms(raw[:, None], y[:, None], ["x"], True, calibration.AUTO)
    assert fitted["form"]["x"] == calibration.TEMPERATURE and fitted["bias"]["x"] == 0.0


def test_temperature_alone_is_the_default_even_where_a_bias_would_fit():
    """The default keeps validation's prevalence out of the scores: no bias is fitted, however
    much it would help on validation, and the temperature is the plain maximum-likelihood one."""
    raw, y = _sigmoid_data(0, 2.0, 1.2)
    card, after = calibration.calibrate(raw[:, None], y[:, None], ["x"], True, "val")
    assert card["asked"] == calibration.TEMPERATURE
    assert card["form"] == {"x": calibration.TEMPERATURE}
    assert card["bias"] == {"x": 0.0} and card["heldout_nll"] == {"x": {}}
    alone = calibration.fit(raw[:, None], y[:, None], ["x"], True)["x"]
    assert card["temperature"]["x"] == alone
    np.testing.assert_allclose(after, calibration.apply(raw[:, None], [card["temperature"]["x"]],
                                                        True), rtol=1e-6)


def test_temperature_and_bias_asked_for_are_fitted_without_a_choice():
    """Asked for, the bias is fitted even where cross-fitting would drop it (no bias in the
    data: the fit is then near 0, not exactly 0), and recovered where there is one."""
    raw, y = _sigmoid_data(5, 2.0, 0.0, n=1000)
    fitted = calibration.fit_forms(raw[:, None], y[:, None], ["x"], True, calibration.WITH_BIAS)
    assert fitted["form"]["x"] == calibration.WITH_BIAS and fitted["heldout_nll"]["x"] == {}
    assert fitted["bias"]["x"] != 0.0 and abs(fitted["bias"]["x"]) < 0.3
    raw, y = _sigmoid_data(1, 0.6, -0.8)
    fitted = calibration.fit_forms(raw[:, None], y[:, None], ["x"], True, calibration.WITH_BIAS)
    assert fitted["bias"]["x"] == pytest.approx(-0.8, abs=0.06)


def test_a_bias_asked_for_on_a_one_class_label_falls_back_to_the_temperature():
    raw = np.array([0.9, 0.8, 0.7, 0.6])
    fitted = calibration.fit_forms(raw[:, None], np.ones((4, 1)), ["x"], True,
                                   calibration.WITH_BIAS)
    assert fitted["form"]["x"] == calibration.TEMPERATURE and fitted["bias"]["x"] == 0.0
    assert fitted["temperature"]["x"] == 1.0


def test_an_unknown_calibration_form_is_refused():
    with pytest.raises(InputError, match="calibration form"):
        calibration.fit_forms(np.full((4, 1), 0.5), np.ones((4, 1)), ["x"], True, "platt")


def test_the_train_spec_offers_every_form_and_only_those():
    import typing

    from medray.workers.specs import TrainSpec

    literal, none = typing.get_args(TrainSpec.model_fields["calibration_form"].annotation)
    assert set(typing.get_args(literal)) == set(calibration.FORMS) and none is type(None)
    # unset: chosen by the recipe when the images' side is known (test_specs.py)
    assert TrainSpec.model_fields["calibration_form"].default is None


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


def test_a_cards_calibration_is_described_in_words():
    assert calibration.describe(None) == calibration.describe({}) == "none"
    old = {"temperature": {"a": 1.2, "b": 1.2}}  # before the form was recorded
    assert calibration.describe(old) == "temperature scaling"
    both = {**old, "form": {"a": calibration.WITH_BIAS, "b": calibration.WITH_BIAS}}
    assert calibration.describe(both) == "temperature scaling with a bias"
    one = {**old, "form": {"a": calibration.TEMPERATURE, "b": calibration.WITH_BIAS}}
    assert calibration.describe(one) == "temperature scaling, with a bias for b"
