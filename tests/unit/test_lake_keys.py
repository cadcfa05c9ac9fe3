"""The embedded lake's keys (cluster/infra/s3server.py): made once on first use, 0600, the same
pair on every later call; a damaged keys file is an error that names the file and the fix,
never a KeyError or a new pair written over it."""

from __future__ import annotations

import json
import os
import stat

import pytest

from medray.cluster.infra import s3server
from medray.workers.errors import InfraError


def test_the_keys_are_made_once_in_a_0600_file(tmp_path):
    creds = s3server._credentials(tmp_path)
    path = tmp_path / "credentials.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert creds["access_key"].startswith("MR") and len(creds["secret_key"]) >= 30
    assert s3server._credentials(tmp_path) == creds
    assert json.loads(path.read_text()) == creds


@pytest.mark.parametrize("damaged", ["{}", "{\"access_key\": \"MRX\"}", "{\"access_key",
                                     "[]", ""])
def test_a_damaged_keys_file_says_what_to_do_and_stays(tmp_path, damaged):
    path = tmp_path / "credentials.json"
    path.write_text(damaged)
    with pytest.raises(InfraError) as err:
        s3server._credentials(tmp_path)
    assert str(path) in str(err.value) and "delete it" in str(err.value)
    assert path.read_text() == damaged  # not replaced: two callers at once could make two pairs
