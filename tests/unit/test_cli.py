"""The CLI surface: fast help without TensorFlow, every documented command present, job options
whose defaults live only in the spec classes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from medray.jobs import cli, sdk
from medray.workers.specs import ReportSpec, ScoreSpec, StageSpec, TrainSpec
from tests.support.paths import MEDRAY

COMMANDS = [
    "stage",
    "train",
    "score",
    "report",
    "predict",
    "submit",
    "cluster",
    "lake",
    "jobs",
    "datasets",
    "models",
]


def test_help_lists_every_command():
    # start-up speed is measured in bench/, not asserted here; what keeps it fast (no
    # TensorFlow or Ray import) is asserted below
    out = subprocess.run([MEDRAY, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in COMMANDS:
        assert cmd in out
    for group, subs in {
        "jobs": ["list", "status", "logs", "stop"],
        "datasets": ["list", "show"],
        "models": ["list", "show", "register", "promote"],
        "cluster": ["up", "down", "status"],
        "lake": ["up", "down", "status"],
    }.items():
        text = subprocess.run(
            [MEDRAY, group, "--help"], capture_output=True, text=True, check=True
        ).stdout
        for sub in subs:
            assert sub in text, (group, sub)


def test_cli_import_does_not_pull_tensorflow_or_ray():
    code = (
        "import sys, medray.jobs.cli; "
        "print(any(m.split('.')[0] in ('tensorflow', 'keras', 'ray') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bad_usage_exits_2(tmp_path):
    proc = subprocess.run([MEDRAY, "score", "--dataset", "d"], capture_output=True, text=True)
    assert proc.returncode == 2
    proc = subprocess.run(
        [
            MEDRAY,
            "train",
            "--dataset",
            "d",
            "--model",
            "m",
            "--epochs",
            "0",
            "--lake",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "epochs" in proc.stderr


def test_layers_import_downward_only():
    from tests.support.paths import ROOT

    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_layers.py")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout


# ---------------------------------------------------------------- options built from the specs
JOB_SPECS = {"stage": StageSpec, "train": TrainSpec, "score": ScoreSpec, "report": ReportSpec}


@pytest.fixture
def submitted(monkeypatch):
    """What a job command hands the SDK: (kind, values) of each call, nothing submitted."""
    calls: list[tuple[str, dict[str, Any]]] = []

    def fake_submit(kind: str, values: dict[str, Any], **_: Any) -> dict[str, Any]:
        calls.append((kind, dict(values)))
        return {"job_id": "medray-test"}

    monkeypatch.setattr(sdk, "submit", fake_submit)
    # `medray report` copies the committed page to a local folder after its job
    monkeypatch.setattr(sdk, "report_copy", lambda *_, **__: Path("/tmp/medray-test/report.html"))
    monkeypatch.delenv("MEDRAY_LAKE", raising=False)
    return calls


@pytest.mark.parametrize("kind", sorted(JOB_SPECS))
def test_job_options_take_default_and_help_from_the_spec(kind):
    spec = JOB_SPECS[kind]
    command = typer.main.get_command(cli.app).commands[kind]
    fields = 0
    for param in command.params:
        flag = next((o for o in param.opts if o.startswith("--")), None)
        field = flag[2:].replace("-", "_") if param.param_type_name == "option" else param.name
        if field not in spec.model_fields or field == "lake":
            continue
        fields += 1
        info = spec.model_fields[field]
        if info.is_required():
            assert param.required, (kind, field)
        else:
            assert param.default == info.default, (kind, field)
        assert info.description, (kind, field)
        if field != "label_names":  # the CLI takes them comma-separated, and says so
            assert param.help == info.description, (kind, field)
    assert fields >= 5, kind


def test_flags_left_at_their_default_do_not_reach_the_spec(submitted):
    result = CliRunner().invoke(
        cli.app, ["train", "-d", "ds", "-m", "m", "--epochs", "3", "--no-augment"]
    )
    assert result.exit_code == 0, result.output
    # --epochs and --no-augment were given; --batch-size, --resume, --arch... were not
    assert submitted == [("train", {"dataset": "ds", "model": "m", "epochs": 3, "augment": False})]


def test_augmentation_left_unset_follows_the_mode(submitted):
    """Unset, --augment is decided by the spec (on in full mode, off in head mode, where the
    backbone-feature cache needs unchanging pixels); given, it wins either way."""
    for args, expected in (([], True), (["--mode", "head"], False),
                           (["--mode", "head", "--augment"], True), (["--no-augment"], False)):
        submitted.clear()
        result = CliRunner().invoke(cli.app, ["train", "-d", "ds", "-m", "m", *args])
        assert result.exit_code == 0, result.output
        if not args:
            assert "augment" not in submitted[0][1], submitted  # unset stays unset
        assert TrainSpec(**submitted[0][1]).augment is expected, args


def test_an_augmentation_recipe_reaches_the_spec(submitted):
    result = CliRunner().invoke(cli.app, ["train", "-d", "ds", "-m", "m", "--mode", "head",
                                          "--augment-recipe", "strong"])
    assert result.exit_code == 0, result.output
    assert submitted == [("train", {"dataset": "ds", "model": "m", "mode": "head",
                                    "augment_recipe": "strong"})]
    spec = TrainSpec(**submitted[0][1])
    assert (spec.augment, spec.augment_recipe) == (True, "strong")


def test_train_summary_names_the_calibration_in_words(monkeypatch):
    result = {"model": "m", "version": 2, "training_id": "t", "metrics": {},
              "val_ece_before": 0.08, "val_ece_after": 0.05, "uri": "file:///lake/models/m/2",
              "calibration": {"temperature": {"a": 1.2, "b": 1.2},
                              "form": {"a": "temperature+bias", "b": "temperature+bias"}}}
    monkeypatch.setattr(sdk, "submit", lambda *_, **__: result)
    shown = CliRunner().invoke(cli.app, ["train", "-d", "ds", "-m", "m"])
    assert shown.exit_code == 0, shown.output
    assert "temperature scaling with a bias" in shown.output
    result["calibration"] = None  # --no-calibrate
    shown = CliRunner().invoke(cli.app, ["train", "-d", "ds", "-m", "m", "--no-calibrate"])
    assert re.search(r"calibration\s+none", shown.output), shown.output


def test_environment_counts_as_given(submitted, tmp_path):
    result = CliRunner().invoke(
        cli.app, ["report", "r1", "--n-boot", "10"], env={"MEDRAY_LAKE": str(tmp_path)}
    )
    assert result.exit_code == 0, result.output
    assert submitted == [("report", {"run_id": "r1", "n_boot": 10, "lake": str(tmp_path)})]


def test_stage_splits_label_names_and_resolves_local_paths(submitted, tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        cli.app,
        [
            "stage",
            "src",
            "-d",
            "ds",
            "--format",
            "npz",
            "--label-names",
            "a,b",
            "--images-root",
            "src",
        ],
    )
    assert result.exit_code == 0, result.output
    src = str((tmp_path / "src").resolve())
    assert submitted == [
        (
            "stage",
            {
                "source": src,
                "dataset": "ds",
                "format": "npz",
                "label_names": ["a", "b"],
                "images_root": src,
            },
        )
    ]
