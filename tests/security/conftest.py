"""Fixtures of the security suite: the shared stage -> train -> score -> report round on the
S3 lake (the same one the fault suite uses when both run), the hostile corpus staged with
originals kept, and the secrets to look for."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.support import faults as h


@pytest.fixture(scope="session")
def pipeline(s3_server, ray_cluster, tmp_path_factory) -> h.Pipeline:
    return h.shared_pipeline(s3_server["bucket"], tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def corpus(s3_server, medray_home, ray_cluster, tmp_path_factory) -> h.CorpusStage:
    return h.shared_corpus_stage(s3_server["bucket"], tmp_path_factory.mktemp("corpus"),
                                 medray_home, ray_cluster["temp_dir"])


@pytest.fixture(scope="session")
def secrets(medray_home: Path, s3_server, ray_cluster) -> dict[str, str]:
    """name -> value of every secret this session's cluster and lake hold.

    The de-identification salt is always among them: ``deid_salt()`` is what staging jobs on
    this machine call (same MEDRAY_HOME), and it creates the salt file when no job has yet,
    so the scans never skip it."""
    from medray.cluster.infra.home import deid_salt

    creds = json.loads((medray_home / "lake" / "credentials.json").read_text())
    found = {"S3 secret key": creds["secret_key"],
             "Ray auth token": (medray_home / "ray" / "auth_token").read_text().strip(),
             "de-identification salt": deid_salt().decode()}
    if not (os.environ.get("MEDRAY_DEID_SALT") or os.environ.get("MEDRAY_DEID_SALT_FILE")):
        # else jobs read the variable (or the file it names), not MEDRAY_HOME's
        assert (medray_home / "deid_salt").read_text().strip() == \
            found["de-identification salt"]
    assert all(len(v) >= 20 for v in found.values()), "a secret too short to scan for"
    return found
