"""After a full stage -> train -> score -> report round on the S3 lake through the CLI, no
secret (the S3 secret key, the Ray token, the de-identification salt) appears in any CLI
output, any job log, any file of Ray's temp dir, or any object of the lake (model cards,
manifests, job history, parquet contents, .keras archives)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support import faults as h
from tests.support.scan import found_in

pytestmark = [pytest.mark.integration]


def test_scanner_finds_secrets_inside_parquet_and_zip(secrets):
    """The scan below must be able to fail: a secret hidden in compressed containers is found."""
    value = next(iter(secrets.values()))
    buf = io.BytesIO()
    # no statistics or dictionary page, which would hold the value uncompressed
    pq.write_table(pa.table({"x": [f"prefix {value} suffix" * 50]}), buf, compression="gzip",
                   write_statistics=False, use_dictionary=False)
    assert value.encode() not in buf.getvalue()  # compressed: a plain byte search misses it
    assert found_in(buf.getvalue(), secrets)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", f'{{"key": "{value}"}}' * 20)
    assert value.encode() not in zbuf.getvalue()
    assert found_in(zbuf.getvalue(), secrets)
    assert not found_in(b"nothing here", secrets)


def test_cli_output_has_no_secret(pipeline, secrets):
    outputs = list(pipeline.outputs)
    for args in (["lake", "status", "--json"], ["lake", "up", "--json"], ["lake", "up"],
                 ["cluster", "status", "--json"], ["jobs", "list", "--json", "--lake",
                                                   pipeline.lake],
                 ["jobs", "show", pipeline.scored["job_id"], "--lake", pipeline.lake],
                 ["models", "show", "cnn:1", "--lake", pipeline.lake],
                 ["datasets", "show", "pneu", "--json", "--lake", pipeline.lake]):
        h.cli(outputs, *args)
    assert len(outputs) >= 2 * 12
    for text in outputs:
        assert not found_in(text, secrets), text[-2000:]


def test_job_logs_have_no_secret(pipeline, secrets):
    for job_id in pipeline.job_ids:
        logs = h.cli(None, "jobs", "logs", job_id).stdout
        assert "MEDRAY_RESULT" in logs, f"no logs came back for {job_id}"
        assert not found_in(logs, secrets), job_id


def _files(root: Path) -> list[Path]:
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                out.append(path)
    return out


def test_ray_temp_dir_files_have_no_secret(pipeline, ray_cluster, secrets):
    files = _files(Path(ray_cluster["temp_dir"]))
    names = " ".join(p.name for p in files)
    assert "job-driver-" in names and "raylet.out" in names, "not Ray's log dir"
    hits = {}
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:  # a file Ray removed meanwhile
            continue
        if found := found_in(data, secrets):
            hits[str(path)] = found
    assert not hits, hits


def test_medray_home_logs_have_no_secret(pipeline, medray_home, secrets):
    """Files that hold secrets by design (0600) are skipped; every other file is scanned, the
    lake's raw volume data aside (its objects are scanned through S3 below)."""
    holders = {"credentials.json", "s3-identities.json", "auth_token", "deid_salt"}
    data_dir = medray_home / "lake" / "data"
    scanned = 0
    for path in _files(medray_home):
        if path.name in holders or data_dir in path.parents:
            continue
        scanned += 1
        assert not found_in(path.read_bytes(), secrets), path
    assert scanned >= 3  # lake.json, cluster.json, weed.log at least


def test_lake_objects_have_no_secret(pipeline, medray_home, s3_server, secrets):
    fs = h.s3fs(medray_home)
    paths = h.lake_files(fs, s3_server["bucket"])
    kinds = {p.rsplit(".", 1)[-1] for p in paths}
    assert {"json", "parquet", "keras"} <= kinds, kinds
    assert any(p.endswith("/card.json") for p in paths)
    hits = {p: found for p in paths if (found := found_in(h.read_object(fs, p), secrets))}
    assert not hits, hits


def test_model_card_has_no_secret_or_credentials(pipeline, medray_home, secrets):
    card = h.cli(None, "models", "show", "cnn:1", "--lake", pipeline.lake).stdout
    _, creds = h.lake_config(medray_home)
    assert '"name": "cnn"' in card
    assert not found_in(card, secrets)
    assert creds["access_key"] not in card
