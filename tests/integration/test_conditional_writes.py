"""The lake's conditional writes on the embedded S3 server (SeaweedFS), through the same boto3
path medray uses on AWS: ``PUT If-None-Match: *``, ``PUT If-Match`` and ``DELETE If-Match``.
The contract (tests/support/conditional.py) is the one the local lake passes in
tests/unit/test_lake.py and tests/unit/test_leases.py. No Ray: only the S3 server."""

from __future__ import annotations

import pytest

from medray.cluster.store import atomic
from medray.cluster.store.lake import Lake
from tests.support import conditional

pytestmark = [pytest.mark.integration]


@pytest.fixture
def lake(s3_lake) -> Lake:
    return Lake(s3_lake)


def test_create_if_absent_on_s3(lake):
    conditional.check_create_if_absent(lake)


def test_replace_and_delete_if_match_on_s3(lake):
    conditional.check_replace_and_delete_if_match(lake)


def test_run_leases_on_s3(lake):
    conditional.check_leases(lake)


def test_concurrent_model_registrations_on_s3(lake, tmp_path):
    conditional.check_concurrent_registrations(lake, tmp_path)


def test_concurrent_dataset_version_claims_on_s3(lake):
    conditional.check_concurrent_dataset_claims(lake)


def test_conditional_writes_refuse_a_missing_bucket(s3_server):
    from medray.workers.errors import PermanentStorageError

    lake = Lake("s3://no-such-bucket-14a/lake")
    with pytest.raises(PermanentStorageError, match="NO_SUCH_BUCKET"):
        atomic.create_if_absent(lake, "x.json", b"{}")
