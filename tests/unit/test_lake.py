"""The lake on a local folder: atomic and durable writes, conditional writes (create-if-absent,
replace/delete-if-unchanged) and the version claims built on them, listings, confinement, error
classification. The conditional-write contract (tests/support/conditional.py) runs on the S3
server too, in tests/integration/test_conditional_writes.py."""

from __future__ import annotations

import os
import stat

import pyarrow as pa
import pytest

from medray.cluster.store import atomic, catalog, registry
from medray.cluster.store import lake as lake_mod
from medray.cluster.store.lake import Lake, classify, with_retries
from medray.workers.errors import ConfigError, InfraError, NotFoundError, PermanentStorageError
from medray.workers.models import ModelCard
from tests.support import conditional


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


# ------------------------------------------------------------------ durable and conditional writes
def test_a_local_write_is_fsynced_before_its_rename_and_the_folder_after(tmp_path, monkeypatch):
    lake = Lake(str(tmp_path / "lake"))
    events: list[str] = []
    real_fsync, real_replace = lake_mod.fsync_path, os.replace
    monkeypatch.setattr(lake_mod, "fsync_path", lambda p: (events.append(
        "dir" if os.path.isdir(p) else "file"), real_fsync(p))[1])
    monkeypatch.setattr(lake_mod.os, "replace", lambda a, b: (events.append("rename"),
                                                              real_replace(a, b))[1])
    lake.write_bytes("d/x.bin", b"payload")
    assert events == ["file", "rename", "dir"]
    assert lake.read_bytes("d/x.bin") == b"payload"


def test_temporaries_carry_the_attempts_tag(tmp_path):
    lake = Lake(str(tmp_path / "lake")).tagged("medray-score-1/../x")
    assert lake.tmp_prefix() == ".tmp-medray-score-1____x-"
    assert lake.tmp_prefix("j2") == ".tmp-j2-" and Lake(lake.uri).tmp_prefix() == ".tmp-"
    import pickle

    assert pickle.loads(pickle.dumps(lake)).tmp_tag == lake.tmp_tag


def test_conditional_write_contract_on_a_local_lake(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    conditional.check_create_if_absent(lake)
    conditional.check_replace_and_delete_if_match(lake)
    leftovers = [p.name for p in (tmp_path / "lake").rglob(".tmp-*")]
    assert leftovers == [], leftovers


def test_a_create_is_durable_and_leaves_a_complete_file_or_none(tmp_path, monkeypatch):
    lake = Lake(str(tmp_path / "lake"))
    synced: list[str] = []
    real = atomic.fsync_path
    monkeypatch.setattr(atomic, "fsync_path", lambda p: (synced.append(p), real(p))[1])
    assert atomic.create_if_absent(lake, "a/b.json", b"{}")
    assert synced == [str(tmp_path / "lake" / "a")]  # the folder, after the link


def test_concurrent_model_registrations_get_distinct_versions_with_their_own_cards(tmp_path):
    conditional.check_concurrent_registrations(Lake(str(tmp_path / "lake")), tmp_path)


@pytest.mark.timeout(300)
def test_registrations_from_several_processes_get_distinct_versions(tmp_path):
    conditional.check_registrations_from_processes(Lake(str(tmp_path / "lake")), tmp_path)


def test_concurrent_dataset_version_claims_are_distinct(tmp_path):
    conditional.check_concurrent_dataset_claims(Lake(str(tmp_path / "lake")))


def test_a_listing_that_races_a_folder_appearing_and_going_does_not_fail(tmp_path):
    """pyarrow's local listing fails with FileNotFoundError when the folder appears between its
    failed list and its existence check (seen in CI as a concurrent first claim of a dataset
    version): 2-3% of listings while another thread creates and removes the folder. The lake
    lists again, so every listing returns."""
    import shutil
    import threading

    lake = Lake(str(tmp_path / "lake"))
    folder = tmp_path / "lake" / "datasets" / "d"
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            (folder / "1").mkdir(parents=True, exist_ok=True)
            shutil.rmtree(folder, ignore_errors=True)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(3000):
            assert lake.list_dirs("datasets/d") in ([], ["1"])
            assert lake.list_files("datasets", recursive=True) == []
    finally:
        stop.set()
        thread.join()


def test_a_registration_whose_file_is_missing_claims_nothing(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    card = ModelCard(name="m", labels=["a"], multi_label=False, input_size=8,
                              channels=1, arch="external")
    with pytest.raises(FileNotFoundError):
        registry.register(lake, str(tmp_path / "nope.keras"), card)
    assert lake.list_dirs("models/m") == []
