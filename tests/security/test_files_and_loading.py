"""File modes, safe loading and path confinement.

- the credentials, the Ray token and the salt are 0600 in 0700 folders; local lake files are
  not readable by other users;
- YAML specs are loaded with safe_load: a ``!!python/...`` tag is refused, nothing runs;
- Keras models load with safe mode: a model with a Lambda layer is refused by
  ``medray models register`` and by ``medray predict`` when planted straight in the lake;
- lake paths cannot leave the lake, and a model version of one lake is never used for another.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from medray.cluster.store.lake import Lake
from medray.jobs.specfile import load_spec_file
from medray.workers.errors import ConfigError
from tests.support import faults as h


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.integration
def test_secret_files_are_private(medray_home, s3_server, ray_cluster, pipeline):
    for rel in ("lake/credentials.json", "lake/s3-identities.json", "lake/lake.json",
                "ray/auth_token", "ray/cluster.json", "deid_salt"):
        path = medray_home / rel
        assert path.exists(), rel
        assert _mode(path) & 0o077 == 0, f"{rel} is {oct(_mode(path))}"
    for rel in ("", "lake", "ray"):
        assert _mode(medray_home / rel) & 0o077 == 0, f"{medray_home / rel} is group/world-open"


def test_local_lake_files_are_not_world_readable(tmp_path):
    """Files are 0600 and a lake root medray creates is 0700; folders below the root follow
    the umask (SECURITY.md), so the check on them is that nobody else can read a file."""
    lake = Lake(str(tmp_path / "lake"))
    lake.write_json("datasets/d/1/manifest.json", {"images": 1})
    lake.write_bytes("models/m/1/model.keras", b"zip")
    import pyarrow as pa

    lake.write_parquet("runs/r/predictions/p.parquet", pa.table({"x": [1]}))
    root = Path(lake.uri)
    assert _mode(root) & 0o077 == 0, oct(_mode(root))
    files = [Path(d) / n for d, _, names in os.walk(root) for n in names]
    assert len(files) == 3
    for path in files:
        assert _mode(path) & 0o077 == 0, f"{path} is {oct(_mode(path))}"


def test_lake_paths_cannot_leave_the_lake(tmp_path):
    (tmp_path / "secret.txt").write_text("outside")
    lake = Lake(str(tmp_path / "lake"))
    for rel in ("../secret.txt", "datasets/../../secret.txt", "a/../../../etc/passwd"):
        with pytest.raises(ConfigError, match="leaves the lake"):
            lake.read_bytes(rel)
        with pytest.raises(ConfigError):
            lake.write_bytes(rel, b"x")
    assert (tmp_path / "secret.txt").read_text() == "outside"


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system"])
def test_yaml_spec_python_tags_are_refused(tmp_path, tag):
    marker = tmp_path / "ran"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"kind: score\nmodel: m\ndataset: {tag} ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_spec_file(spec, [], str(tmp_path / "lake"))
    assert not marker.exists()


def _lambda_model(path: Path, marker: Path) -> Path:
    """A 28 px model whose Lambda layer touches ``marker`` whenever Keras runs it."""
    import keras

    target = str(marker)
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Lambda(
        lambda t: t + float(__import__("pathlib").Path(target).touch() or 0))(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(path)
    marker.unlink(missing_ok=True)  # building the model ran the lambda once, here
    return path


def _constant_model(path: Path, favour: int) -> Path:
    """A 28 px two-label model whose scores do not depend on the image."""
    import keras

    inputs = keras.Input((28, 28, 1))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    dense = keras.layers.Dense(2, activation="softmax")
    outputs = dense(x)
    bias = np.array([4.0, -4.0] if favour == 0 else [-4.0, 4.0], np.float32)
    dense.set_weights([np.zeros((1, 2), np.float32), bias])
    keras.Model(inputs, outputs).save(path)
    return path


def _image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "xray.png"
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(path)
    return path


def test_lambda_model_is_refused_by_register(tmp_path):
    marker = tmp_path / "lambda-ran"
    model = _lambda_model(tmp_path / "evil.keras", marker)
    lake = tmp_path / "lake"
    proc = h.cli(None, "models", "register", str(model), "--name", "evil", "--labels", "a,b",
                 "--lake", str(lake), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "safe" in proc.stderr.lower() or "lambda" in proc.stderr.lower(), proc.stderr[-1000:]
    assert not marker.exists(), "the Lambda layer ran"
    assert not (lake / "models" / "evil").exists()


def test_lambda_model_planted_in_the_lake_is_refused_when_loaded(tmp_path):
    marker = tmp_path / "lambda-ran"
    model = _lambda_model(tmp_path / "evil.keras", marker)
    lake = Lake(str(tmp_path / "lake"))
    lake.write_bytes("models/planted/1/model.keras", model.read_bytes())
    card = {"name": "planted", "version": 1, "labels": ["a", "b"], "multi_label": False,
            "input_size": 28, "channels": 1, "arch": "external"}
    lake.write_json("models/planted/1/card.json", card)
    proc = h.cli(None, "predict", str(_image(tmp_path)), "--model", "planted:1", "--lake",
                 lake.uri, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot load model" in proc.stderr
    assert not marker.exists(), "the Lambda layer ran"


def test_same_model_name_in_two_lakes_is_not_confused(tmp_path):
    """`medray predict` caches model files per lake: the same NAME:VERSION in two lakes (or
    another user's file in a shared temp dir) is never used instead of the one asked for."""
    img = str(_image(tmp_path))
    name = f"same-{tmp_path.name[-12:]}"
    tops = []
    for favour in (0, 1):
        lake = str(tmp_path / f"lake{favour}")
        model = _constant_model(tmp_path / f"m{favour}.keras", favour)
        h.cli(None, "models", "register", str(model), "--name", name, "--labels",
              "normal,pneumonia", "--lake", lake, timeout=120)
        out = json.loads(h.cli(None, "predict", img, "--model", f"{name}:1", "--lake", lake,
                               "--json", timeout=120).stdout.strip().splitlines()[-1])
        tops.append(next(iter(out.values()))[0][0])
    assert tops == ["normal", "pneumonia"], tops
