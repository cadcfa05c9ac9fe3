"""The lake on a local folder: atomic writes, listings, confinement, error classification."""

from __future__ import annotations

import os
import stat

import pyarrow as pa
import pytest

from medray.cluster.store import catalog, registry
from medray.cluster.store.lake import Lake, classify, with_retries
from medray.workers.errors import ConfigError, InfraError, NotFoundError, PermanentStorageError


def test_roundtrip_and_listing(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_json("a/b/x.json", {"k": 1})
    lake.write_parquet("a/t.parquet", pa.table({"v": [1, 2, 3]}))
    assert lake.read_json("a/b/x.json") == {"k": 1}
    assert lake.read_parquet("a/t.parquet").column("v").to_pylist() == [1, 2, 3]
    assert lake.list_files("a") == ["a/t.parquet"]
    assert lake.list_files("a", recursive=True) == ["a/b/x.json", "a/t.parquet"]
    assert lake.list_dirs("a") == ["b"]
    assert lake.list_files("missing") == []
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path / "lake" / "a"))


def test_local_files_are_private(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_bytes("x.bin", b"secret-ish")
    mode = stat.S_IMODE(os.stat(tmp_path / "lake" / "x.bin").st_mode)
    assert mode & 0o077 == 0


def test_missing_and_escaping_paths(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    with pytest.raises(NotFoundError):
        lake.read_bytes("nope.json")
    assert lake.read_json_or_none("nope.json") is None
    with pytest.raises(ConfigError, match="leaves the lake"):
        lake.read_bytes("../outside.txt")
    with pytest.raises(ConfigError):
        Lake("ftp://host/x")
    with pytest.raises(ConfigError, match="no bucket"):
        Lake("s3:///prefix")


def test_classification_and_retries():
    assert classify(OSError("AWS Error ACCESS_DENIED during GetObject")) == "permanent"
    assert classify(OSError("curl error: Couldn't connect to server")) == "transient"
    assert classify(OSError("something else")) == "other"
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("Connection refused")
        return "ok"

    assert with_retries(flaky, "op", deadline_s=10) == "ok" and len(calls) == 3
    with pytest.raises(PermanentStorageError, match="credentials"):
        with_retries(lambda: (_ for _ in ()).throw(OSError("ACCESS_DENIED")), "op")
    with pytest.raises(InfraError, match="unreachable"):
        with_retries(lambda: (_ for _ in ()).throw(OSError("timed out")), "op", deadline_s=0.5)


def test_dataset_versions_need_a_manifest(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_json("datasets/d/1/manifest.json", {"images": 1})
    lake.write_bytes("datasets/d/2/shards/part-00000.parquet", b"partial")  # never committed
    assert catalog.committed_versions(lake, "d") == [1]
    assert catalog.next_version(lake, "d") == 3
    with pytest.raises(NotFoundError, match="no committed version 2"):
        catalog.resolve(lake, "d:2")
    with pytest.raises(NotFoundError, match="medray stage"):
        catalog.resolve(lake, "other")


def test_model_refs_and_aliases(tmp_path):
    from medray.workers.models import ModelCard

    lake = Lake(str(tmp_path / "lake"))
    f = tmp_path / "m.keras"
    f.write_bytes(b"not really a model")
    for _ in range(2):
        registry.register(
            lake,
            str(f),
            ModelCard(
                name="m",
                labels=["a"],
                multi_label=False,
                input_size=8,
                channels=1,
                arch="small_cnn",
            ),
        )
    assert registry.versions(lake, "m") == [1, 2]
    assert registry.resolve(lake, "m").version == 2
    assert registry.resolve(lake, "m:1").version == 1
    registry.promote(lake, "m", 1, "prod")
    assert registry.resolve(lake, "m@prod").version == 1
    with pytest.raises(NotFoundError, match="no alias"):
        registry.resolve(lake, "m@staging")
    with pytest.raises(ConfigError):
        registry.parse_ref("m:x:y")
