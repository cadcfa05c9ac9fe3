"""Job specs: validation, suggestions, precedence of --set > env > file > defaults."""

from __future__ import annotations

import pytest

from medray.jobs.specfile import load_spec_file
from medray.workers.errors import ConfigError
from medray.workers.specs import ReportSpec, ScoreSpec, TrainSpec, build_spec


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


def test_a_train_spec_records_one_spelling_per_recipe_and_turns_augmentation_on_for_it():
    def spec(**values: object) -> TrainSpec:
        built = build_spec("train", {"dataset": "d", "model": "m", **values})
        assert isinstance(built, TrainSpec)
        return built

    assert (spec().augment, spec().augment_recipe) == (True, "auto")
    assert spec(augment_recipe=" Auto ").augment_recipe == "auto"
    # the preset written out, or by another name, is the preset
    assert spec(augment_recipe="crop=0.05,rotation=0.02,brightness=0.1").augment_recipe == "light"
    assert spec(augment_recipe="STRONG").augment_recipe == "strong"
    assert spec(augment_recipe="rotate=0.05,crop=0.2").augment_recipe == \
        "flip=false,crop=0.2,rotation=0.05,brightness=0"
    # head mode trains without augmentation unless a recipe is given
    assert spec(mode="head").augment is False
    assert spec(mode="head", augment_recipe="strong").augment is True
    assert spec(mode="head", augment_recipe="light").augment is True
    with pytest.raises(ConfigError, match="with --no-augment"):
        spec(augment=False, augment_recipe="strong")
    with pytest.raises(ConfigError, match="use --no-augment"):
        spec(augment_recipe="none")
    with pytest.raises(ConfigError, match="unknown transform or preset 'blur'"):
        spec(augment_recipe="crop,blur")


@pytest.mark.parametrize(
    ("values", "size", "recipe", "form"),
    [
        # the defaults: strong below 128 px, with the balanced bias its crop needs
        ({}, 28, "strong", "temperature+balanced-bias"),
        ({}, 127, "strong", "temperature+balanced-bias"),
        ({}, 128, "light", "temperature"),
        ({}, 224, "light", "temperature"),
        # a form asked for is kept, whatever the recipe
        ({"calibration_form": "temperature"}, 28, "strong", "temperature"),
        ({"calibration_form": "auto"}, 224, "light", "auto"),
        # a recipe asked for is kept at every size; a crop of 0.15 or more gets the bias
        ({"augment_recipe": "light"}, 28, "light", "temperature"),
        ({"augment_recipe": "strong"}, 224, "strong", "temperature+balanced-bias"),
        ({"augment_recipe": "crop=0.15"}, 64, "flip=false,crop=0.15,rotation=0,brightness=0",
         "temperature+balanced-bias"),
        ({"augment_recipe": "crop=0.1,brightness=0.3"}, 28,
         "flip=false,crop=0.1,rotation=0,brightness=0.3", "temperature"),
        # no augmentation (asked, or head mode's default): no recipe, the temperature alone
        ({"augment": False}, 28, "light", "temperature"),
        ({"mode": "head"}, 28, "light", "temperature"),
    ],
)
def test_a_train_spec_resolves_its_recipe_and_calibration_form_by_the_images_side(
        values, size, recipe, form):
    built = build_spec("train", {"dataset": "d", "model": "m", **values})
    assert isinstance(built, TrainSpec)
    resolved = built.for_images(size)
    assert (resolved.augment_recipe, resolved.calibration_form) == (recipe, form)
    # resolved once, it stays: what spec.json records is what a resumed training compares
    assert resolved.for_images(size) == resolved
    assert TrainSpec.model_validate(resolved.model_dump()) == resolved


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
