"""Operating points chosen on validation by a named rule, frozen into the model card.

``--operating-point`` takes a comma-separated list of rules, each ``youden``,
``sensitivity=0.95`` or ``specificity=0.90``, optionally for one label only
(``Effusion:sensitivity=0.9``). Every label gets each rule that names it or no label; the first
such rule gives the label's threshold (the one the scorer and the report use first), the others
are kept beside it so the report can show the model at each of them.

A rule picks an observed validation score (``score >= threshold`` is positive); the threshold
stored is midway between it and the next lower observed score. The validation metrics stored
with it are the same, and a validation image exactly at the boundary does not change sides when
another batch size or machine scores it a few ulps differently (the training job and the scorer
run the model on different batches):

- ``youden``: the maximum of sensitivity + specificity - 1 (ties: the highest threshold);
- ``sensitivity=x``: the highest threshold whose sensitivity is at least x (so the best
  specificity that keeps x);
- ``specificity=x``: the lowest threshold whose specificity is at least x (the best
  sensitivity that keeps x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medray.workers import metrics
from medray.workers.errors import ConfigError

DEFAULT = "youden"
_TOL = 1e-12  # a rate equal to its target must count as reaching it despite float rounding
_FLAG = "--operating-point"


@dataclass(frozen=True)
class Rule:
    kind: str  # youden | sensitivity | specificity
    target: float | None = None
    label: str | None = None  # None: every label

    @property
    def name(self) -> str:
        """The rule as the card and the report print it (without its label)."""
        return self.kind if self.target is None else f"{self.kind}={self.target:g}"


def parse(text: str) -> list[Rule]:
    """``youden,sensitivity=0.95,Effusion:specificity=0.9`` -> rules; ConfigError naming the
    fix otherwise."""
    rules = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        label, _, body = part.rpartition(":")
        kind, eq, value = body.strip().lower().partition("=")
        if kind == "youden" and not eq:
            rules.append(Rule("youden", None, label.strip() or None))
            continue
        if kind not in ("sensitivity", "specificity") or not eq:
            raise ConfigError(f"{_FLAG}: {part!r} is not a rule; use youden, sensitivity=0.95 "
                              "or specificity=0.90, optionally as LABEL:RULE")
        try:
            target = float(value)
        except ValueError:
            raise ConfigError(f"{_FLAG}: {part!r}: {value!r} is not a number") from None
        if not 0.0 < target <= 1.0:
            raise ConfigError(f"{_FLAG}: {part!r}: the target must lie in (0, 1], e.g. 0.95")
        rules.append(Rule(kind, target, label.strip() or None))
    if not rules:
        raise ConfigError(f"{_FLAG}: give at least one rule, e.g. youden")
    return rules


def check_labels(rules: Sequence[Rule], labels: Sequence[str]) -> None:
    """ConfigError for a rule naming a label the dataset does not have."""
    for rule in rules:
        if rule.label is not None and rule.label not in labels:
            raise ConfigError(f"{_FLAG}: no label {rule.label!r} in this dataset (labels: "
                              f"{', '.join(labels)})")


def _between(s: np.ndarray, score: float) -> float:
    """Midway between ``score`` and the next lower observed score (or 0 / score - 1 below
    the lowest): the same calls on ``s``, with a margin on both sides."""
    lower = s[s < score]
    below = float(lower.max()) if lower.size else (0.0 if score > 0 else score - 1.0)
    return (score + below) / 2


def threshold(y: np.ndarray, s: np.ndarray, rule: Rule) -> float:
    """The rule's threshold on validation labels ``y`` (0/1) and scores ``s``; both classes
    must be present (the caller checks)."""
    s = np.asarray(s, dtype=np.float64)
    if rule.kind == "youden":
        return _between(s, metrics.best_threshold(y, s, "youden"))
    fpr, tpr, thr = metrics.roc_curve(y, s)  # thresholds descending, thr[0] = inf
    assert rule.target is not None
    if rule.kind == "sensitivity":
        i = int(np.argmax(tpr >= rule.target - _TOL))  # tpr reaches 1 at the lowest score
        return _between(s, float(thr[i]))
    ok = np.flatnonzero(1.0 - fpr >= rule.target - _TOL)  # fpr rises as thresholds fall
    i = int(ok[-1])
    if i == 0:  # not even the highest score keeps the specificity: call nothing positive
        top = float(thr[1])
        return (top + max(1.0, top + 1e-6)) / 2 if top < 1.0 else top + 0.5
    return _between(s, float(thr[i]))


def choose(y: np.ndarray, scores: np.ndarray, labels: Sequence[str], rules: Sequence[Rule],
           split: str) -> list[dict[str, Any]]:
    """Every (label, rule) operating point on validation, the primary one first per label.

    A label whose validation has one class cannot be placed by any rule: it gets 0.5, said so
    in ``rule``."""
    points: list[dict[str, Any]] = []
    for j, label in enumerate(labels):
        yj, sj = np.asarray(y[:, j], dtype=bool), np.asarray(scores[:, j], dtype=np.float64)
        mine = [r for r in rules if r.label in (None, label)]
        both = 0 < yj.sum() < len(yj)
        for k, rule in enumerate(mine):
            t = threshold(yj, sj, rule) if both else 0.5
            at = metrics.threshold_metrics(yj, sj, t) if len(yj) else {}
            points.append({
                "label": label, "rule": rule.name if both else f"{rule.name} (not placed: "
                f"{split} has one class; 0.5)", "primary": k == 0, "threshold": t,
                "chosen_on": split,
                **{f"{split}_{m}": at.get(m, math.nan) for m in metrics.RATES}})
    return points


def primary_thresholds(points: Sequence[dict[str, Any]]) -> dict[str, float]:
    """label -> the threshold of its first rule: the card's ``thresholds``."""
    return {p["label"]: float(p["threshold"]) for p in points if p.get("primary")}
