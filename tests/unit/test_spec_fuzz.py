"""Fuzzing the spec parser: ``jobs.specs.build_spec`` over random dicts and
``jobs.specfile.load_spec_file`` over random YAML text and --set overrides give a valid spec or
a ConfigError (exit 2, a message), never another exception. A valid spec also survives the trip
the job makes: JSON to the cluster, validated again there (jobs/entry.py)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medray.jobs.specfile import load_spec_file
from medray.workers.errors import ConfigError
from medray.workers.specs import SPECS, build_spec

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
SPEC_FILE = Path(tempfile.mkdtemp(prefix="medray-specfuzz-")) / "spec.yaml"
KINDS = sorted(SPECS)
FIELDS = sorted({f for cls in SPECS.values() for f in cls.model_fields})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-5, 5000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["auto", "npz", "full", "head", "none", "date", "10%", "5", "small_cnn",
                     "/tmp/x", "s3://bucket/p", "d", "m", "m:1", "m@prod", "../../etc"]),
)
values_ = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=5)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=20))
spec_dicts = st.dictionaries(keys, values_, max_size=10)


def _check_valid(kind: str, spec: Any) -> None:
    assert isinstance(spec, SPECS[kind])
    wire = json.loads(json.dumps(spec.model_dump()))  # what jobs_client sends, entry rebuilds
    again = build_spec(kind, wire)
    assert again == spec


@FUZZ
@given(kind=st.one_of(st.sampled_from(KINDS), st.text(max_size=10)), values=spec_dicts)
def test_build_spec_gives_a_spec_or_config_error(kind: str, values: dict[str, Any]) -> None:
    try:
        spec = build_spec(kind, values)
    except ConfigError as exc:
        assert exc.message
        return
    _check_valid(kind, spec)


@st.composite
def plausible(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """Mostly well-typed values for the kind's own fields: reaches the validators' edges."""
    kind = draw(st.sampled_from(KINDS))
    fields = SPECS[kind].model_fields
    required = {"stage": {"source": "/tmp/x", "dataset": "d"},
                "train": {"dataset": "d", "model": "m"},
                "score": {"dataset": "d", "model": "m"}, "report": {"run_id": "r1"},
                "publish": {"run_id": "r1", "to": "dicomweb://pacs/dicom-web"}}[kind]
    values: dict[str, Any] = dict(required)
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=6)):
        values[name] = draw(st.one_of(scalars, st.integers(-2, 100000),
                                      st.floats(-1, 5000, allow_nan=False)))
    return kind, values


@FUZZ
@given(plausible())
def test_build_spec_on_plausible_values(kv: tuple[str, dict[str, Any]]) -> None:
    kind, values = kv
    try:
        spec = build_spec(kind, values)
    except ConfigError:
        return
    _check_valid(kind, spec)
    for name, value in spec.model_dump().items():
        if isinstance(value, float):
            assert not math.isnan(value), f"{name} accepted NaN"


def _load(text: str, overrides: list[str] | None = None) -> None:
    SPEC_FILE.write_text(text)
    try:
        kind, values = load_spec_file(SPEC_FILE, overrides or [], None)
    except ConfigError as exc:
        assert exc.message
        return
    _check_valid(kind, build_spec(kind, values))


string_key_docs = st.dictionaries(st.one_of(st.sampled_from(["kind", *FIELDS]),
                                            st.text(max_size=12)), values_, max_size=8)


@settings(FUZZ, max_examples=60)
@given(doc=string_key_docs, kind=st.sampled_from([*KINDS, "scor", ""]))
def test_load_spec_file_on_yaml_mappings(doc: dict[str, Any], kind: str) -> None:
    doc = {k: v for k, v in doc.items() if isinstance(k, str)}
    doc.setdefault("kind", kind)
    _load(yaml.safe_dump(doc, allow_unicode=True))


@FUZZ
@example(text="kind: score\n1: 2\n")  # a non-string key once reached difflib: TypeError
@given(text=st.one_of(st.text(max_size=200),
                     st.text(alphabet="kind:score\n 0123-[]{},.&*!?", max_size=60)))
def test_load_spec_file_on_random_text(text: str) -> None:
    _load(text)


@FUZZ
@example(override="epochs=[")  # once a yaml.ParserError, not a ConfigError
@given(override=st.text(max_size=30))
def test_set_overrides(override: str) -> None:
    _load("kind: score\ndataset: d\nmodel: m\n", [override])
