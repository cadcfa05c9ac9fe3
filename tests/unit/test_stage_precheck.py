"""The stage precheck in the CLI process (no Ray): what it refuses before a job is submitted,
with the fix in the message, and what it leaves to the job (remote clusters, storage it cannot
see from here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from medray.cluster.infra import ray_local
from medray.cluster.stage import csv_source, precheck
from medray.cluster.store.lake import Lake
from medray.workers.errors import ConfigError, NotFoundError
from medray.workers.specs import StageSpec


def _spec(source: Path | str, **kw) -> StageSpec:
    return StageSpec(source=str(source), dataset="d", **kw)


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_missing_local_source_is_refused_with_exit_2(tmp_path):
    with pytest.raises(NotFoundError, match="source not found: .*s3://bucket/prefix") as err:
        precheck.check_source(_spec(tmp_path / "nothing"), local_files=True)
    assert err.value.exit_code == 2


def test_a_missing_csv_named_source_is_refused_too(tmp_path):
    # the name alone gives the format; the file must still exist
    with pytest.raises(NotFoundError, match="source not found"):
        precheck.check_source(_spec(tmp_path / "Data_Entry_2017.csv"), local_files=True)


def test_local_paths_are_left_alone_for_a_remote_cluster(tmp_path):
    precheck.check_source(_spec(tmp_path / "nothing"), local_files=False)


def test_precheck_asks_whether_the_cluster_is_this_machine(tmp_path, monkeypatch):
    spec, lake = _spec(tmp_path / "nothing"), Lake(str(tmp_path / "lake"))
    monkeypatch.setattr(ray_local, "is_local", lambda address: address is None)
    with pytest.raises(NotFoundError):
        precheck.precheck(spec, lake, None)
    precheck.precheck(spec, lake, "http://elsewhere:8265")


def test_an_existing_folder_passes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not checked here")
    precheck.check_source(_spec(tmp_path), local_files=True)


def test_a_file_of_unknown_format_needs_format(tmp_path):
    scan = tmp_path / "scan.nii"
    scan.write_bytes(b"x")
    with pytest.raises(ConfigError, match="pass --format folder\\|npz\\|csv\\|dicom"):
        precheck.check_source(_spec(scan), local_files=True)
    precheck.check_source(_spec(scan, format="folder"), local_files=True)


def test_csv_columns_are_checked_from_the_header(tmp_path):
    path = _csv(tmp_path / "labels.csv", "\ufefffile,finding,pid\nx.png,A,1\n")
    with pytest.raises(ConfigError, match="no column 'Image Index'.*--path-column"):
        precheck.check_source(_spec(path), local_files=True)
    with pytest.raises(ConfigError, match="did you mean 'finding'.*--label-column"):
        precheck.check_source(_spec(path, path_column="file", label_column="findings"),
                              local_files=True)
    with pytest.raises(ConfigError, match="no patient column 'patient'"):
        precheck.check_source(_spec(path, path_column="file", label_column="finding",
                                    patient_column="patient"), local_files=True)
    # the default patient column may be missing (file names group the splits then)
    precheck.check_source(_spec(path, path_column="file", label_column="finding"),
                          local_files=True)
    precheck.check_source(_spec(path, path_column="file", label_column="finding",
                                patient_column="pid"), local_files=True)


def test_tsv_header_uses_tabs(tmp_path):
    path = _csv(tmp_path / "labels.tsv", "Image Index\tFinding Labels\nx.png\tA\n")
    precheck.check_source(_spec(path), local_files=True)


def test_a_csv_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"Image Index,Finding Labels\n\xff\xfe,\x81\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):  # as the job would
        precheck.check_source(_spec(path), local_files=True)


def test_only_the_head_of_a_large_csv_is_read(tmp_path):
    path = tmp_path / "labels.csv"
    # 33 header bytes, then 9-byte rows: the read ends inside the 2-byte character of a row
    head = "Image Index,Finding Labels,Extra\n" + "x.png,\u00e9\n" * 200_000
    assert (csv_source.HEADER_BYTES - 33) % 9 == 7
    path.write_bytes(head.encode() + b"\xff")  # undecodable, but past what the precheck reads
    precheck.check_source(_spec(path), local_files=True)


def test_a_missing_images_root_is_refused(tmp_path):
    path = _csv(tmp_path / "m.csv", "Image Index,Finding Labels\nx.png,A\n")
    with pytest.raises(NotFoundError, match="--images-root not found"):
        precheck.check_source(_spec(path, images_root=str(tmp_path / "imgs")),
                              local_files=True)
    (tmp_path / "imgs").mkdir()
    precheck.check_source(_spec(path, images_root=str(tmp_path / "imgs")), local_files=True)


def test_npz_needs_image_arrays(tmp_path):
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros(2))
    np.savez(bad, pictures=np.zeros((2, 4, 4), np.uint8))
    precheck.check_source(_spec(good), local_files=True)
    with pytest.raises(ConfigError, match="no '<split>_images' arrays .*'pictures'"):
        precheck.check_source(_spec(bad), local_files=True)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="cannot read .* as .npz"):
        precheck.check_source(_spec(tmp_path / "text.npz"), local_files=True)


class _Unreachable:
    """A remote filesystem that cannot answer from this machine."""

    def get_file_info(self, path: str) -> pafs.FileInfo:
        raise OSError("connection refused")


def test_s3_source_gets_one_existence_check(tmp_path, monkeypatch):
    # a non-local filesystem over a temporary folder stands in for the bucket
    bucket = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    (tmp_path / "images").mkdir()
    monkeypatch.setattr(precheck, "source_filesystem",
                        lambda uri: (bucket, uri.removeprefix("s3://b/")))
    precheck.check_source(_spec("s3://b/images"), local_files=False)
    with pytest.raises(NotFoundError, match="source not found: s3://b/missing"):
        precheck.check_source(_spec("s3://b/missing"), local_files=False)


def test_s3_source_that_cannot_be_seen_from_here_is_left_to_the_job(monkeypatch):
    monkeypatch.setattr(precheck, "source_filesystem", lambda uri: (_Unreachable(), "b/x"))
    precheck.check_source(_spec("s3://b/x"), local_files=True)


def test_an_unsupported_uri_scheme_is_refused():
    with pytest.raises(ConfigError, match="use a local path or s3://bucket/prefix"):
        precheck.check_source(_spec("gs://bucket/images"), local_files=False)
