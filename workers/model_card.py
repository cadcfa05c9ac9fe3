"""The model card (Mitchell et al., "Model Cards for Model Reporting", FAT* 2019): what a model
version is for, what it was trained and validated on, how well it does with confidence
intervals, how its scores are calibrated, where its thresholds sit and why, how it does per
patient group, and what it must not be used for.

The card is JSON in the registry (``models/<name>/<version>/card.json``, written at
registration; each report of a run scored by the version adds its evaluation under
``evaluations``). ``SCHEMA`` is its JSON Schema, checked in the tests; ``render_text`` is what
``medray models show`` prints and ``render_html`` the section of the HTML report.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from medray.workers.calibration import CARD_FORMS
from medray.workers.calibration import FORMS as CALIBRATION_FORMS
from medray.workers.calibration import describe as describe_calibration
from medray.workers.jsonsafe import json_safe

FORMAT = 2  # bump when a field changes meaning; readers accept cards without the new fields
DEFAULT_USE = ("Research use only: not a medical device, not cleared for diagnosis, triage or "
               "treatment decisions.")
DEFAULT_OUT_OF_SCOPE = (
    "Diagnosis or triage of patients without a clinician's own reading.",
    "Patients, devices, views or sites unlike the training data without a local evaluation.",
)
EXTERNAL_LIMITATION = (
    "Registered from a file: medray knows nothing of its training data or validation; its "
    "scores are uncalibrated and its thresholds 0.5 until a report measures it on local data.")
NOT_MEASURED = "Performance per patient group (age, sex, view) has not been measured"
DEFAULT_ETHICS = (
    "Scores can differ between patient groups; check the subgroup tables of a report before "
    "relying on the model for any group.",
    "Images are de-identified at staging; burned-in text in pixels is not removed.",
)


@dataclass
class ModelCard:
    name: str
    labels: list[str]
    multi_label: bool
    input_size: int
    channels: int
    arch: str
    version: int | None = None
    preprocessing: str = "uint8 pixels in; scaling inside the model"
    thresholds: dict[str, float] = field(default_factory=dict)
    dataset: str | None = None
    dataset_version: int | None = None
    weights: str = "none"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_seconds: float | None = None
    code_version: str | None = None
    created_at: str | None = None
    source: str = "trained"
    training: dict[str, Any] = field(default_factory=dict)  # id, jobs, resumes, feature cache
    # Mitchell et al.'s sections, beyond the model details above
    card_format: int = FORMAT
    intended_use: dict[str, Any] = field(default_factory=lambda: {
        "primary": DEFAULT_USE, "out_of_scope": list(DEFAULT_OUT_OF_SCOPE)})
    training_data: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    operating_points: list[dict[str, Any]] = field(default_factory=list)
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> report
    limitations: list[str] = field(default_factory=list)
    ethical_considerations: list[str] = field(default_factory=lambda: list(DEFAULT_ETHICS))

    def __post_init__(self) -> None:
        if not self.limitations and self.source.startswith("registered"):
            self.limitations = [EXTERNAL_LIMITATION]

    def to_json(self) -> str:
        return json.dumps(json_safe(asdict(self)), indent=2, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        return dict(json_safe(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def threshold(self, label: str) -> float:
        return float(self.thresholds.get(label, 0.5))


def intended_use(primary: str | None, out_of_scope: str | None,
                 from_file: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's intended use: a file's values, overridden by flags, else the defaults.
    ``out_of_scope`` given as text is split on ';' into items."""
    doc = dict(from_file or {})
    use = primary or doc.get("primary") or DEFAULT_USE
    oos: Any = out_of_scope if out_of_scope is not None else doc.get("out_of_scope")
    if isinstance(oos, str):
        oos = [s.strip() for s in oos.split(";") if s.strip()]
    out = {"primary": str(use), "out_of_scope": list(oos or DEFAULT_OUT_OF_SCOPE)}
    if doc.get("users"):
        out["users"] = str(doc["users"])
    return out


def limitations(card: ModelCard, extra: list[str] | None = None) -> list[str]:
    """What the numbers in the card cannot tell, from what the card knows, plus the user's."""
    out = list(extra or [])
    val = card.validation or {}
    split = val.get("split") or "val"
    out.append(f"Validated on {val.get('images', 'an unknown number of')} images of "
               f"{card.dataset}:{card.dataset_version} ({split} split) only: performance on "
               "other sites, devices or populations is unknown until a report measures it.")
    if split == "test":
        out.append("The dataset has no validation split: thresholds and calibration were "
                   "chosen on the test split, so test metrics of this dataset are optimistic.")
    if card.calibration:
        out.append(f"Calibration ({describe_calibration(card.calibration)}) was fitted on "
                   "the validation split: a different prevalence elsewhere shifts predictive "
                   "values (PPV, NPV) and calibration; re-check both on local data.")
    prev = (card.training_data or {}).get("splits", {}).get("train", {})
    n, labels = prev.get("images"), prev.get("labels") or {}
    rare = [lab for lab, k in labels.items() if n and k / n < 0.05]
    if rare:
        out.append(f"Rare labels in training (<5% of images): {', '.join(rare)}; their "
                   "intervals are wide.")
    if not card.evaluations or not any(e.get("subgroups") for e in card.evaluations.values()):
        out.append(f"{NOT_MEASURED} for this version: `medray report RUN --subgroups ...` on a "
                   "dataset that keeps those attributes adds it here.")
    return out


def mean_value(per_label: dict[str, Any] | None) -> float | None:
    """The mean of a per-label dict's finite numbers (None when there are none)."""
    vals = [v for v in (per_label or {}).values()
            if isinstance(v, int | float) and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def evaluation_entry(summary: dict[str, Any], per_label: list[dict[str, Any]],
                     operating: list[dict[str, Any]], subgroups: list[dict[str, Any]],
                     gaps: list[dict[str, Any]]) -> dict[str, Any]:
    """What a report adds to the card of the model version that scored the run."""
    keep = ("label", "images", "with_truth", "positives", "auroc", "auroc_lo", "auroc_hi",
            "ece", "ece_lo", "ece_hi")
    return json_safe({
        "run_id": summary.get("run_id"), "dataset": summary.get("dataset"),
        "dataset_version": summary.get("dataset_version"), "split": summary.get("split"),
        "images": summary.get("images"), "with_truth": summary.get("with_truth"),
        "ci": summary.get("ci_note"), "created_at": summary.get("created_at"),
        "labels": [{k: r.get(k) for k in keep} for r in per_label],
        "operating_points": operating, "subgroups": subgroups, "subgroup_gaps": gaps})


# --------------------------------------------------------------------------- schema

_NUM = {"type": ["number", "null"]}
_STR_LIST = {"type": "array", "items": {"type": "string"}}
_OBJ = {"type": "object"}
_RATES = ("sensitivity", "specificity", "ppv", "npv", "f1")
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://medray.dev/schemas/model-card-2.json",
    "title": "medray model card (Mitchell et al. 2019)",
    "type": "object",
    "required": ["name", "labels", "multi_label", "input_size", "channels", "arch", "version",
                 "thresholds", "intended_use", "limitations", "ethical_considerations",
                 "card_format"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "version": {"type": ["integer", "null"], "minimum": 1},
        "labels": {**_STR_LIST, "minItems": 1},
        "multi_label": {"type": "boolean"},
        "input_size": {"type": "integer", "minimum": 1},
        "channels": {"enum": [1, 3]},
        "arch": {"type": "string"},
        "card_format": {"type": "integer", "minimum": 2},
        "thresholds": {"type": "object", "additionalProperties": {"type": "number"}},
        "intended_use": {
            "type": "object", "required": ["primary", "out_of_scope"],
            "properties": {"primary": {"type": "string", "minLength": 1},
                           "out_of_scope": {**_STR_LIST, "minItems": 1},
                           "users": {"type": "string"}}},
        "training_data": {
            "type": "object",
            "properties": {
                "dataset": {"type": ["string", "null"]},
                "version": {"type": ["integer", "null"]},
                "splits": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["images", "labels"],
                    "properties": {"images": {"type": "integer", "minimum": 0},
                                   "labels": {"type": "object", "additionalProperties":
                                              {"type": "integer", "minimum": 0}}}}}}},
        "validation": {
            "type": "object",
            "properties": {
                "split": {"type": "string"}, "images": {"type": "integer"},
                "ci": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["auroc", "auroc_lo", "auroc_hi"],
                    "properties": {k: _NUM for k in ("auroc", "auroc_lo", "auroc_hi", "ece",
                                                     "ece_lo", "ece_hi")}}}}},
        "calibration": {
            "type": "object",
            "properties": {
                "method": {"type": "string"}, "fitted_on": {"type": "string"},
                "temperature": {"type": "object",
                                "additionalProperties": {"type": "number",
                                                         "exclusiveMinimum": 0}},
                # optional: cards written before the bias existed hold temperatures alone
                "bias": {"type": "object", "additionalProperties": {"type": "number"}},
                "form": {"type": "object",
                         "additionalProperties": {"enum": list(CARD_FORMS)}},
                "asked": {"enum": list(CALIBRATION_FORMS)},
                "selection": {"type": "string"},
                "heldout_nll": {"type": "object", "additionalProperties": {
                    "type": "object", "additionalProperties": {"type": "number"}}},
                "ece_before": {"type": "object", "additionalProperties": _NUM},
                "ece_after": {"type": "object", "additionalProperties": _NUM}},
            "dependentRequired": {"method": ["temperature", "fitted_on"]}},
        "operating_points": {"type": "array", "items": {
            "type": "object", "required": ["label", "rule", "threshold", "primary"],
            "properties": {"label": {"type": "string"}, "rule": {"type": "string"},
                           "threshold": {"type": "number"}, "primary": {"type": "boolean"}}}},
        "evaluations": {"type": "object", "additionalProperties": {
            "type": "object", "required": ["run_id", "labels"],
            "properties": {"run_id": {"type": "string"},
                           "labels": {"type": "array", "items": _OBJ},
                           "operating_points": {"type": "array", "items": _OBJ},
                           "subgroups": {"type": "array", "items": _OBJ},
                           "subgroup_gaps": {"type": "array", "items": _OBJ}}}},
        "limitations": _STR_LIST,
        "ethical_considerations": _STR_LIST,
        "metrics": _OBJ, "hyperparameters": _OBJ, "training": _OBJ,
    },
}


# --------------------------------------------------------------------------- rendering


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _ci(row: dict[str, Any], key: str) -> str:
    lo, hi = row.get(f"{key}_lo"), row.get(f"{key}_hi")
    text = _fmt(row.get(key))
    if lo is not None and hi is not None:
        text += f" ({_fmt(lo)}-{_fmt(hi)})"
    return text


def sections(card: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The card as (heading, lines) in Mitchell et al.'s order; shared by text and HTML."""
    use = card.get("intended_use") or {}
    out: list[tuple[str, list[str]]] = []
    out.append(("Model details", [
        f"{card.get('name')}:{card.get('version')} - {card.get('arch')}, "
        f"{card.get('input_size')} px x {card.get('channels')} channel(s), "
        f"{'sigmoid per label' if card.get('multi_label') else 'softmax'} over "
        f"{', '.join(card.get('labels') or [])}",
        f"weights: {card.get('weights')}; source: {card.get('source')}; "
        f"created {card.get('created_at')}; {card.get('code_version') or ''}".rstrip("; ")]))
    out.append(("Intended use", [f"primary: {use.get('primary', DEFAULT_USE)}",
                                 *(f"out of scope: {x}" for x in use.get("out_of_scope", [])),
                                 *([f"users: {use['users']}"] if use.get("users") else [])]))
    td = card.get("training_data") or {}
    lines = [f"dataset {td.get('dataset', card.get('dataset'))}:"
             f"{td.get('version', card.get('dataset_version'))}"]
    for split, s in (td.get("splits") or {}).items():
        by = ", ".join(f"{k} {v}" for k, v in (s.get("labels") or {}).items())
        lines.append(f"{split}: {s.get('images')} images ({by})")
    out.append(("Training data", lines))
    val = card.get("validation") or {}
    lines = [f"{val.get('split', '?')} split, {val.get('images', '?')} images; "
             f"{val.get('ci', '')}"] if val else ["not recorded"]
    for label, m in (val.get("labels") or {}).items():
        lines.append(f"{label}: AUROC {_ci(m, 'auroc')}, ECE {_ci(m, 'ece')}")
    out.append(("Validation metrics", lines))
    cal = card.get("calibration") or {}
    if cal:
        temps = ", ".join(f"{k} {_fmt(v)}" for k, v in (cal.get("temperature") or {}).items())
        if cal.get("bias"):
            temps += "; bias " + ", ".join(f"{k} {_fmt(v)}" for k, v in cal["bias"].items())
        forms = sorted(set((cal.get("form") or {}).values()))
        before = ", ".join(f"{k} {_fmt(v)}" for k, v in (cal.get("ece_before") or {}).items())
        after = ", ".join(f"{k} {_fmt(v)}" for k, v in (cal.get("ece_after") or {}).items())
        lines = [f"{cal.get('method')} on {cal.get('fitted_on')} ({cal.get('images')} images): "
                 f"T = {temps}",
                 *([f"form: {', '.join(forms)} ({cal.get('selection')})"] if forms else []),
                 f"ECE before: {before}", f"ECE after: {after}",
                 "scores are calibrated when scored; raw_score_<label> keeps the model's own"]
    else:
        lines = ["none: scores are the model's own probabilities"]
    out.append(("Calibration", lines))
    lines = []
    for p in card.get("operating_points") or []:
        split = p.get("chosen_on", "val")
        rates = ", ".join(f"{r} {_fmt(p.get(f'{split}_{r}'))}" for r in _RATES)
        lines.append(f"{p['label']} {p['rule']}{' (primary)' if p.get('primary') else ''}: "
                     f"threshold {_fmt(p['threshold'], 4)} ({split}: {rates})")
    out.append(("Operating points", lines or [
        f"thresholds {card.get('thresholds') or '0.5 (default)'}, rule not recorded"]))
    lines = []
    for run_id, ev in sorted((card.get("evaluations") or {}).items()):
        lines.append(f"run {run_id} ({ev.get('dataset')}:{ev.get('dataset_version')}, split "
                     f"{ev.get('split')}, {ev.get('with_truth')} images with truth): " + "; ".join(
                         f"{r['label']} AUROC {_ci(r, 'auroc')} ECE {_ci(r, 'ece')}"
                         for r in ev.get("labels") or []))
        for g in ev.get("subgroup_gaps") or []:
            flag = " FLAGGED" if g.get("flagged") else ""
            lines.append(f"  {g['label']} by {g['attribute']}: largest {g['metric']} gap "
                         f"{_ci(g, 'gap')} ({g.get('high')} vs {g.get('low')}){flag}")
    out.append(("Quantitative analyses", lines or ["no report on a run of this version yet"]))
    out.append(("Ethical considerations", list(card.get("ethical_considerations") or [])))
    out.append(("Caveats and limitations", list(card.get("limitations") or [])))
    return out


def render_text(card: dict[str, Any]) -> str:
    """The card for a terminal: `medray models show`."""
    parts = [f"Model card: {card.get('name')}:{card.get('version')}"]
    for heading, lines in sections(card):
        parts.append(f"\n## {heading}")
        parts.extend(f"- {line}" if not line.startswith("  ") else f"  {line}"
                     for line in lines)
    return "\n".join(parts)


def render_html(card: dict[str, Any]) -> str:
    """The card as an HTML fragment (escaped) for the report page."""
    parts = [f"<h2>Model card: {html.escape(str(card.get('name')))}:"
             f"{html.escape(str(card.get('version')))}</h2>"]
    for heading, lines in sections(card):
        items = "".join(f"<li>{html.escape(line.strip())}</li>" for line in lines)
        parts.append(f"<h3>{html.escape(heading)}</h3><ul>{items}</ul>")
    return "\n".join(parts)
