"""The model card (workers/model_card.py, workers/validation.py): a card built the way training
and reports build it validates against its JSON Schema; a broken one does not; the text and HTML
renderings carry Mitchell et al.'s sections."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from medray.workers import calibration
from medray.workers import model_card as mc
from medray.workers import operating_points as op
from medray.workers.validation import summarise

LABELS = ["normal", "pneumonia"]


def _validation(seed: int = 0, n: int = 400, form: str = calibration.AUTO) -> dict:
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < 0.7).astype(int)
    z = rng.normal(size=n) * 3 + 4 * truth - 2
    p1 = 1 / (1 + np.exp(-z))
    raw = np.c_[1 - p1, p1].astype(np.float32)
    y = np.eye(2, dtype=np.float32)[truth]
    units = np.array([f"patient:{i // 2}" for i in range(n)], dtype=object)
    return summarise(y, raw, units, LABELS, False, "val",
                     op.parse("youden,pneumonia:sensitivity=0.95"), n_boot=200, form=form)


def _trained_card() -> mc.ModelCard:
    found = _validation()
    card = mc.ModelCard(
        name="pneu", labels=LABELS, multi_label=False, input_size=28, channels=1,
        arch="small_cnn", version=3, thresholds=found["thresholds"], dataset="pmnist",
        dataset_version=1,
        intended_use=mc.intended_use(None, "screening adults; triage", {"users": "researchers"}),
        training_data={"dataset": "pmnist", "version": 1,
                       "splits": {"train": {"images": 3882, "labels": {"normal": 388,
                                                                      "pneumonia": 3494}},
                                  "val": {"images": 524, "labels": {"normal": 135,
                                                                    "pneumonia": 389}}}},
        validation=found["validation"], calibration=found["calibration"],
        operating_points=found["operating_points"])
    card.limitations = mc.limitations(card, ["Trained on paediatric images only."])
    return card


def test_a_trained_card_validates_against_the_schema():
    card = _trained_card().to_dict()
    jsonschema.validate(card, mc.SCHEMA)
    json.loads(json.dumps(card, allow_nan=False))  # strict JSON: no NaN tokens
    assert card["intended_use"]["out_of_scope"] == ["screening adults", "triage"]
    assert card["intended_use"]["primary"] == mc.DEFAULT_USE
    assert card["calibration"]["temperature"]["normal"] == card["calibration"]["temperature"][
        "pneumonia"]  # one temperature for a softmax model
    cal = card["calibration"]  # the validation data has a bias (prevalence 0.7): kept
    assert cal["form"] == {"normal": "temperature+bias", "pneumonia": "temperature+bias"}
    assert cal["asked"] == "auto"
    assert cal["bias"]["normal"] == 0.0 and cal["bias"]["pneumonia"] > 0
    rules = [(p["label"], p["rule"], p["primary"]) for p in card["operating_points"]]
    assert rules == [("normal", "youden", True), ("pneumonia", "youden", True),
                     ("pneumonia", "sensitivity=0.95", False)]
    v = card["validation"]["labels"]["pneumonia"]
    assert v["auroc_lo"] <= v["auroc"] <= v["auroc_hi"] and v["ece_lo"] <= v["ece_hi"]
    assert "patients" in card["validation"]["ci"]
    assert card["limitations"][0] == "Trained on paediatric images only."
    assert any(x.startswith(mc.NOT_MEASURED) for x in card["limitations"])
    # the limitations name the calibration the card holds
    assert any(x.startswith("Calibration (temperature scaling with a bias) was fitted on the "
                            "validation split") for x in card["limitations"])


def test_a_class_balanced_card_validates_and_leaves_validation_prevalence_out():
    """Validation at 70% positives, fitted with both classes weighted equally: the bias is
    smaller than the plain fit's, which takes in the 70%."""
    found = _validation(form=calibration.BALANCED)
    cal = found["calibration"]
    assert cal["asked"] == calibration.BALANCED
    assert set(cal["form"].values()) == {calibration.BALANCED}
    plain = _validation(form=calibration.WITH_BIAS)["calibration"]
    assert cal["bias"]["normal"] == 0.0
    assert cal["bias"]["pneumonia"] < plain["bias"]["pneumonia"]
    jsonschema.validate({**_trained_card().to_dict(), "calibration": cal}, mc.SCHEMA)
    card = _trained_card()
    card.calibration = cal
    assert any(x.startswith("Calibration (temperature scaling with a class-balanced bias) ")
               for x in mc.limitations(card))


def test_a_temperature_only_card_holds_no_bias_and_validates():
    found = _validation(form=calibration.TEMPERATURE)
    cal = found["calibration"]
    assert cal["asked"] == "temperature" and set(cal["form"].values()) == {"temperature"}
    assert set(cal["bias"].values()) == {0.0}
    jsonschema.validate({**_trained_card().to_dict(), "calibration": cal}, mc.SCHEMA)


def test_a_card_with_a_report_evaluation_validates():
    card = _trained_card()
    summary = {"run_id": "r1", "dataset": "pmnist", "dataset_version": 1, "split": "test",
               "images": 624, "with_truth": 624, "ci_note": "patients"}
    per_label = [{"label": "pneumonia", "images": 624, "auroc": 0.95, "auroc_lo": 0.93,
                  "auroc_hi": 0.97, "ece": float("nan"), "ece_lo": None, "ece_hi": None}]
    gaps = [{"label": "pneumonia", "attribute": "sex", "metric": "auroc", "high": "F",
             "low": "M", "gap": 0.1, "gap_lo": 0.02, "gap_hi": 0.2, "flagged": True}]
    card.evaluations["r1"] = mc.evaluation_entry(summary, per_label, [], [{"group": "F"}], gaps)
    doc = card.to_dict()
    jsonschema.validate(doc, mc.SCHEMA)
    assert doc["evaluations"]["r1"]["labels"][0]["ece"] is None
    text = mc.render_text(doc)
    assert "largest auroc gap 0.100 (0.020-0.200) (F vs M) FLAGGED" in text


def test_a_registered_users_model_gets_the_default_card_and_it_validates():
    card = mc.ModelCard(name="theirs", labels=["a", "b"], multi_label=True, input_size=64,
                        channels=3, arch="external", version=1, source="registered from x")
    doc = card.to_dict()
    jsonschema.validate(doc, mc.SCHEMA)
    assert doc["intended_use"]["primary"].startswith("Research use only")
    assert doc["card_format"] == mc.FORMAT
    assert doc["limitations"] == [mc.EXTERNAL_LIMITATION]


@pytest.mark.parametrize("breakage", [
    lambda d: d["intended_use"].pop("primary"),
    lambda d: d["intended_use"].update(out_of_scope=[]),
    lambda d: d["calibration"]["temperature"].update(normal=-1.0),
    lambda d: d["calibration"]["form"].update(normal="platt"),
    lambda d: d["calibration"]["bias"].update(normal="0.5"),
    lambda d: d["operating_points"][0].pop("rule"),
    lambda d: d.update(channels=2),
    lambda d: d.pop("limitations"),
])
def test_a_broken_card_fails_the_schema(breakage):
    doc = _trained_card().to_dict()
    breakage(doc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, mc.SCHEMA)


def test_a_card_written_before_the_bias_still_validates_and_renders():
    """Cards registered with temperatures alone (no bias, form or selection) stay valid."""
    doc = _trained_card().to_dict()
    for key in ("bias", "form", "selection", "heldout_nll"):
        doc["calibration"].pop(key)
    jsonschema.validate(doc, mc.SCHEMA)
    text = mc.render_text(doc)
    assert "bias" not in text.split("## Calibration")[1].split("##")[0]
    assert "T = normal " in text


def test_the_schema_is_itself_valid():
    jsonschema.Draft202012Validator.check_schema(mc.SCHEMA)


def test_text_and_html_carry_every_section():
    doc = _trained_card().to_dict()
    text = mc.render_text(doc)
    html = mc.render_html(doc)
    for heading in ("Model details", "Intended use", "Training data", "Validation metrics",
                    "Calibration", "Operating points", "Quantitative analyses",
                    "Ethical considerations", "Caveats and limitations"):
        assert f"## {heading}" in text and f"<h3>{heading}</h3>" in html
    assert "pneumonia sensitivity=0.95: threshold" in text
    assert "train: 3882 images (normal 388, pneumonia 3494)" in text
    hostile = {**doc, "intended_use": {"primary": "<script>x</script>", "out_of_scope": ["a"]}}
    assert "<script>" not in mc.render_html(hostile)
