"""configs/*.yaml: every YAML parses, and every job spec validates against the spec classes
and through `medray submit`'s loader, with the values the nightly and retraining jobs rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medray.jobs import specfile
from medray.workers.errors import ConfigError
from medray.workers.specs import build_spec
from tests.support.configs import (
    ALL_YAML,
    CONFIGS,
    EXPECTED_KINDS,
    JOB_SPECS,
    job_spec,
    load_all,
)


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_expected_job_specs_exist() -> None:
    assert set(EXPECTED_KINDS) <= {p.name for p in JOB_SPECS}


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_job_spec_validates(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert "kind" in doc, f"{path.name}: a job spec needs `kind: stage|train|score|report`"
    kind = doc.pop("kind")
    if path.name in EXPECTED_KINDS:
        assert kind == EXPECTED_KINDS[path.name]
    spec = build_spec(kind, doc)  # ConfigError (unknown key, bad value) fails the test
    assert spec.kind == kind


def test_spec_validation_is_strict() -> None:
    """Guard for the test above: a misspelt key must not slip through as a default."""
    doc = yaml.safe_load((CONFIGS / "nightly-score.yaml").read_text())
    doc.pop("kind")
    doc["only_neww"] = doc.pop("only_new")
    with pytest.raises(ConfigError, match="only_new"):
        build_spec("score", doc)


def test_nightly_score_is_incremental_with_the_promoted_model() -> None:
    spec = job_spec("nightly-score.yaml")
    assert spec.only_new, "the nightly run must score only images not scored before"
    assert spec.model.endswith("@prod"), "the nightly run scores with the promoted model"
    assert spec.gpus_per_actor >= 1 and spec.gpus_per_actor == int(spec.gpus_per_actor)
    assert spec.run_id is None, "the schedule sets run_id per night (--set run_id=...)"


def test_retrain_is_multi_gpu_densenet() -> None:
    spec = job_spec("retrain-chexnet.yaml")
    assert (spec.arch, spec.weights, spec.class_weights) == ("densenet121", "imagenet", "auto")
    assert spec.workers > 1 and spec.gpus_per_worker == 1
    assert spec.dataset == job_spec("stage-chestxray14.yaml").dataset


def test_pneumoniamnist_source_resolves_from_the_spec_file() -> None:
    """`medray submit` resolves a relative stage source against the spec file's folder."""
    spec = job_spec("stage-pneumoniamnist.yaml")
    source = (CONFIGS / spec.source).resolve()
    assert source.suffix == ".npz"
    if not source.exists():
        pytest.skip(f"{source} is not on this machine (shared data lives beside the checkout)")


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_job_spec_loads_through_the_cli_loader(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same file through `medray submit`'s loader (precedence, path resolution, validation)."""
    monkeypatch.delenv("MEDRAY_LAKE", raising=False)
    kind, values = specfile.load_spec_file(path, [], None)
    assert kind == yaml.safe_load(path.read_text())["kind"]
    source = values.get("source")
    if kind == "stage" and source and "://" not in source and not Path(source).is_absolute():
        pytest.skip(f"{path.name}: source {source} is not on this machine")
