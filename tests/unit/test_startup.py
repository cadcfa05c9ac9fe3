"""Start-up pieces that need no Ray (issue 17): the readers' wait for the whole scorer pool, the
CLI noticing a job's end as soon as its driver exits, the driver leaving without the
interpreter's teardown, and TensorFlow's import without the scikit-learn that Keras would pull
in."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from medray.cluster.infra import jobs_client, wire
from medray.cluster.score import remote
from medray.cluster.score.remote import PoolStart, scorers_started, wait_for_scorers
from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.workers.errors import InfraError


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake"))


def _record(lake: Lake, actor: str, job_id: str) -> None:
    lake.write_json(layout.run_actor("r1", actor), {"actor_id": actor, "job_id": job_id})


def test_only_this_attempts_scorers_count(lake):
    start = PoolStart(run_id="r1", job_id="j2", actors=2, timeout_s=5)
    _record(lake, "a-old", "j1")  # an earlier attempt of the same run
    _record(lake, "a1", "j2")
    known: dict[str, bool] = {}
    assert scorers_started(lake, start, known) == 1
    _record(lake, "a2", "j2")
    assert scorers_started(lake, start, known) == 2
    assert sorted(p.rsplit("/", 1)[-1] for p, mine in known.items() if not mine) == ["a-old.json"]


def test_reader_waits_for_the_last_scorer(lake):
    start = PoolStart(run_id="r1", job_id="j1", actors=2, timeout_s=30)
    _record(lake, "a1", "j1")
    late = threading.Timer(0.5, _record, (lake, "a2", "j1"))
    t0 = time.monotonic()
    late.start()
    wait_for_scorers(lake, start, poll_s=0.05)
    assert time.monotonic() - t0 >= 0.5
    assert scorers_started(lake, start, {}) == 2


def test_reader_gives_up_with_the_count_after_the_timeout(lake):
    _record(lake, "a1", "j1")
    start = PoolStart(run_id="r1", job_id="j1", actors=3, timeout_s=0.3)
    with pytest.raises(InfraError, match="only 1 of 3 scorer actor"):
        wait_for_scorers(lake, start, poll_s=0.05)


def test_reader_holds_its_rows_until_the_pool_is_up(lake, monkeypatch):
    waited: list[PoolStart] = []
    monkeypatch.setattr(remote, "wait_for_scorers", lambda lk, st: waited.append(st))
    from medray.workers.shards import shard_table

    rows = [{"image_id": f"i{i}", "source_uri": f"/s/{i}", "labels": [], "split": "test",
             "height": 2, "width": 2, "channels": 1, "pixels": bytes(4)} for i in range(3)]
    path = layout.shard("d", 1, "part-00000.parquet")
    lake.write_parquet(path, shard_table(rows))
    start = PoolStart(run_id="r1", job_id="j1", actors=1, timeout_s=5)
    reader = remote.ShardReader(lake.uri, None, None, None, rows_per_block=2, pool=start)
    parts = list(reader({"path": [path, path]}))
    assert [p.num_rows for p in parts] == [2, 1, 2, 1]
    assert waited == [start]  # once, before the first rows; never again


class _FakeJobs:
    """A Jobs API whose job prints its result line at ``result_at`` and ends at ``end_at``."""

    def __init__(self, result_at: float, end_at: float) -> None:
        self.t0 = time.monotonic()
        self.result_at, self.end_at = result_at, end_at
        self.status_calls = 0

    def get_job_status(self, job_id: str) -> SimpleNamespace:
        self.status_calls += 1
        done = time.monotonic() - self.t0 >= self.end_at
        return SimpleNamespace(value="SUCCEEDED" if done else "RUNNING")

    def get_job_logs(self, job_id: str) -> str:
        text = "working\n"
        if time.monotonic() - self.t0 >= self.result_at:
            text += wire.result_line({"images": 3}) + "\n"
        return text


def test_wait_notices_the_end_soon_after_the_result_line(monkeypatch):
    fake = _FakeJobs(result_at=0.1, end_at=0.9)
    monkeypatch.setattr(jobs_client, "client", lambda address: fake)
    seen: list[str] = []
    state, text = jobs_client.wait("j1", None, on_log=seen.append, poll_s=5.0)
    waited = time.monotonic() - fake.t0
    assert state == "SUCCEEDED"
    # the job ended at 0.9 s; a 5 s poll would have seen it at 5 s
    assert 0.9 <= waited < 0.9 + 2 * jobs_client.EXIT_POLL_S + 0.3
    assert "".join(seen) == text and wire.RESULT in text


def test_wait_reads_a_young_job_often_and_an_old_one_at_poll_s(monkeypatch):
    fake = _FakeJobs(result_at=1e9, end_at=1e9)
    monkeypatch.setattr(jobs_client, "client", lambda address: fake)
    monkeypatch.setattr(jobs_client, "YOUNG_FOR_S", 1.2)
    state, _ = jobs_client.wait("j1", None, poll_s=2.0, timeout_s=3.0)
    assert state == "RUNNING"  # given up at the time limit
    # young, every 0.5 s: at 0, 0.5, 1.0 and 1.5 s; old, every 2 s: at 3.5 s, past the limit
    # (at poll_s throughout: 3 reads; every 0.5 s throughout: 7)
    assert fake.status_calls == 5


def test_a_driver_stuck_in_its_exit_is_watched_quickly_once(monkeypatch):
    fake = _FakeJobs(result_at=0.0, end_at=1e9)  # printed its result, never ends
    monkeypatch.setattr(jobs_client, "client", lambda address: fake)
    monkeypatch.setattr(jobs_client, "_EXIT_WAIT_S", 0.3)
    monkeypatch.setattr(jobs_client, "YOUNG_FOR_S", 0.0)
    state, _ = jobs_client.wait("j1", None, poll_s=1.0, timeout_s=2.5)
    assert state == "RUNNING"
    # one quick watch (about 4 asks in 0.3 s), then one ask per 1 s poll (at 0, 1.3, 2.3 and
    # 3.3 s); a quick watch after every poll would make it 13 or more
    assert fake.status_calls <= 10, fake.status_calls


def test_tensorflow_import_leaves_scikit_learn_out_but_importable():
    code = ("import sys\n"
            "from medray.workers.models import import_tensorflow\n"
            "took = import_tensorflow()\n"
            "assert 'tensorflow' in sys.modules and took > 0\n"
            "print('sklearn' in sys.modules)\n"
            "import sklearn\n"
            "print(bool(sklearn.__version__))\n"
            "print(import_tensorflow())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True, env={"TF_CPP_MIN_LOG_LEVEL": "3",
                                                        "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["False", "True", "0.0"]


# a driver's last lines, printed and logged without a flush, then the exit; the atexit handler
# stands for the interpreter's and Ray's teardown, which leave() skips
_LEAVE = """
import atexit, logging, sys
from medray.jobs.entry import leave
atexit.register(lambda: print('teardown ran'))
logging.basicConfig(stream=sys.stderr, format='%(message)s')
sys.stdout.write('MEDRAY_RESULT {}')
logging.getLogger('x').warning('last log line')
leave(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [0, 1, 2])
def test_the_driver_leaves_with_its_code_and_every_line_but_no_teardown(code):
    out = subprocess.run([sys.executable, "-c", _LEAVE, str(code)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == code
    assert out.stdout == "MEDRAY_RESULT {}"
    assert out.stderr.strip().splitlines()[-1] == "last log line"
