"""DICOM PHI never reaches the lake: a DICOM with a patient name, id, accession number and
institution is staged with its original bytes kept, and no lake object of that dataset (shards
with their metadata and de-identified originals, the manifest, the errors table, the job
history) holds any of those values."""

from __future__ import annotations

import hashlib

import pytest

from tests.support import faults as h
from tests.support.scan import found_in

pytestmark = [pytest.mark.integration]
PHI = {f"phi{i}": value for i, value in enumerate(h.PHI_TEXT)}


def test_phi_scan_would_see_the_source(corpus):
    assert found_in(corpus.paths["phi.dcm"].read_bytes(), PHI) == sorted(PHI)


def test_no_phi_in_the_lake_after_staging_dicom(corpus, medray_home):
    assert corpus.status == "SUCCEEDED", "\n".join(corpus.outputs)[-3000:]
    phi_id = hashlib.sha256(corpus.paths["phi.dcm"].read_bytes()).hexdigest()
    staged = {r["image_id"]: r for r in corpus.shards.to_pylist()}
    row = staged.get(phi_id)
    assert row is not None, "the DICOM was not staged: the scan would prove nothing"
    assert row["original"], "--keep-original kept no bytes"
    assert row["format"] == "dicom" and row["source_uri"].startswith("dicom:")
    fs = h.s3fs(medray_home)
    paths = h.lake_files(fs, h.lake_base(corpus.lake))
    assert any(p.endswith("manifest.json") for p in paths)
    hits = {p: found for p in paths if (found := found_in(h.read_object(fs, p), PHI))}
    assert not hits, hits


def test_no_phi_in_the_staging_job_output(corpus):
    for text in corpus.outputs:
        assert not found_in(text, PHI), text[-2000:]
