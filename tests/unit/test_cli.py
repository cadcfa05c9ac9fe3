"""The CLI surface: fast help without TensorFlow, every documented command present."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import MEDRAY

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
    from tests.conftest import ROOT

    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "check_layers.py")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout
