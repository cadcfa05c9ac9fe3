"""Job specs: validation, suggestions, precedence of --set > env > file > defaults."""

from __future__ import annotations

import pytest

from medray.jobs.specfile import load_spec_file
from medray.workers.errors import ConfigError
from medray.workers.specs import ReportSpec, ScoreSpec, build_spec


def test_defaults_fill_in():
    spec = build_spec("score", {"dataset": "d", "model": "m"})
    assert isinstance(spec, ScoreSpec)
    assert spec.actors == 1 and spec.batch_size == 256 and spec.split is None


@pytest.mark.parametrize(
    ("kind", "values", "needle"),
    [
        ("score", {"dataset": "d", "model": "m", "actorz": 2}, "did you mean 'actors'"),
        ("train", {"dataset": "d", "model": "m", "epoch": 2}, "did you mean 'epochs'"),
        ("stage", {"source": "s", "dataset": "d", "image_size": "big"}, "image_size"),
        ("stage", {"source": "s", "dataset": "bad/name"}, "dataset"),
        ("score", {"dataset": "d", "model": "m", "gpus_per_actor": 0.5}, "whole GPUs"),
        ("score", {"dataset": "d", "model": "m", "run_id": "../../etc"}, "run id"),
        ("stage", {"source": "s", "dataset": "d", "max_errors": "lots"}, "max-errors"),
        ("nonsense", {}, "unknown job kind"),
        ("report", {"run_id": "r", "n_boot": -1}, "n_boot"),
    ],
)
def test_bad_values_are_config_errors(kind, values, needle):
    with pytest.raises(ConfigError, match=needle):
        build_spec(kind, values)


def test_spec_is_frozen():
    spec = build_spec("report", {"run_id": "r1"})
    assert isinstance(spec, ReportSpec)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError
        spec.run_id = "other"  # type: ignore[misc]


def test_precedence_set_over_env_over_file(tmp_path, monkeypatch):
    path = tmp_path / "s.yaml"
    path.write_text("kind: score\ndataset: d\nmodel: m\nactors: 2\nlake: /from/file\n")
    kind, values = load_spec_file(path, [], None)
    assert (kind, values["actors"], values["lake"]) == ("score", 2, "/from/file")
    monkeypatch.setenv("MEDRAY_LAKE", "/from/env")
    _, values = load_spec_file(path, ["actors=5"], None)
    assert values["actors"] == 5 and values["lake"] == "/from/env"
    _, values = load_spec_file(path, [], "/from/flag")
    assert values["lake"] == "/from/flag"


@pytest.mark.parametrize(
    "text",
    [
        "kind: [unclosed\n",
        "- just\n- a list\n",
        "dataset: d\nmodel: m\n",
        "kind: score\ndataset: d\nmodel: m\nactors: many\n",
        "!!python/object/apply:os.system ['echo hacked']\n",
    ],
)
def test_bad_spec_files(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_spec_file(path, [], None)


def test_set_needs_key_value(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("kind: report\nrun_id: r\n")
    with pytest.raises(ConfigError, match="key=value"):
        load_spec_file(path, ["oops"], None)
