"""The score job's pieces that need no Ray, on a local-folder lake: the shard reader's row
choice, writing shard files as their rows complete under the run's lease, the commit, and the
resume checks (options, and the check of an earlier attempt's files)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from medray.cluster.infra.context import JobContext
from medray.cluster.score import job, resume
from medray.cluster.score.commit import RunFiles, commit, tidy, write_shard
from medray.cluster.score.precheck import check_resume
from medray.cluster.score.remote import ShardReader
from medray.cluster.store import layout, leases
from medray.cluster.store.lake import Lake
from medray.jobs import sdk
from medray.workers.errors import InfraError, InputError, NotFoundError
from medray.workers.models import ModelCard
from medray.workers.scorer import prediction_schema
from medray.workers.shards import shard_table
from medray.workers.specs import ScoreSpec

LABELS = ("effusion", "mass")
SHARDS = [layout.shard("cxr", 1, f"part-{i:05d}.parquet") for i in range(3)]
STEMS = [layout.shard_stem(p) for p in SHARDS]


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake")).tagged("j1")


@pytest.fixture
def lease(lake) -> leases.Lease:
    """Run r1's lease, held by job j1 (Ray knows no job in these tests)."""
    return leases.acquire(lake, "r1", "j1", lambda job_id: None, by="test")


def _take_over(lake) -> None:
    """Job j9 takes r1's lease over, as it would from a dead j1."""
    leases.acquire(lake, "r1", "j9", lambda job_id: "FAILED" if job_id == "j1" else None,
                   by="test")


def _shard_rows(shard: int, n: int) -> list[dict]:
    return [{"image_id": f"s{shard}-{i}", "source_uri": f"/src/{shard}/{i}.png", "labels": [],
             "split": "test" if i % 2 else "train", "height": 4, "width": 4, "channels": 1,
             "pixels": bytes(16)} for i in range(n)]


def _scored(stem: str, ids: list[str], total: int, failed: tuple[str, ...] = ()) -> pa.Table:
    """What the scorer pool hands back for some rows of one shard."""
    n = len(ids)
    cols = {"image_id": ids, "source_uri": [f"/src/{i}" for i in ids], "true_labels": [[]] * n,
            **{f"score_{lab}": [None if i in failed else 0.25 for i in ids] for lab in LABELS},
            "predicted_labels": [None if i in failed else [] for i in ids],
            "error": [f"bad_pixels: {i}" if i in failed else None for i in ids]}
    table = pa.table(cols, schema=prediction_schema(list(LABELS)))
    return table.append_column("_shard", pa.array([stem] * n)) \
        .append_column("_shard_rows", pa.array([total] * n, pa.int64()))


def _files(run_id: str = "r1", date_dir: str = "") -> RunFiles:
    return RunFiles(run_id=run_id, model="tiny", model_version=3, labels=LABELS,
                    date_dir=date_dir)


def _attempt(files: RunFiles, lease: leases.Lease,
             stale: frozenset[str] = frozenset()) -> job.Attempt:
    card = ModelCard(name="tiny", labels=list(LABELS), multi_label=True, input_size=4,
                     channels=1, arch="small_cnn", version=3)
    return job.Attempt(spec=ScoreSpec(dataset="cxr", model="tiny"), job_id="j1", card=card,
                       files=files, gpus=0.0, pending=tuple(SHARDS), skip=None, only=None,
                       stale_errors=stale, lease=lease)


def _doc(run_id: str = "r1", only_new: bool = False) -> dict:
    return {"run_id": run_id, "dataset": "cxr", "dataset_version": 1, "model": "tiny",
            "model_version": 3, "only_new": only_new, "split": None, "retry_failed": None,
            "partition_by": "none"}


# ------------------------------------------------------------------ the shard reader
def test_reader_yields_only_wanted_rows_in_blocks_tagged_with_their_shard(lake):
    lake.write_parquet(SHARDS[0], shard_table(_shard_rows(0, 10)))
    skip = pa.array(["s0-1"])
    reader = ShardReader(lake.uri, "test", skip, None, rows_per_block=2)
    blocks = list(reader({"path": [SHARDS[0]]}))
    ids = [i for b in blocks for i in b.column("image_id").to_pylist()]
    assert ids == ["s0-3", "s0-5", "s0-7", "s0-9"]  # the test split, less the skipped id
    assert [b.num_rows for b in blocks] == [2, 2]
    for block in blocks:
        assert block.column("_shard").to_pylist() == [STEMS[0]] * block.num_rows
        assert block.column("_shard_rows").to_pylist() == [4] * block.num_rows


def test_reader_with_only_yields_those_ids_and_nothing_for_a_shard_without_them(lake):
    lake.write_parquet(SHARDS[0], shard_table(_shard_rows(0, 6)))
    lake.write_parquet(SHARDS[1], shard_table(_shard_rows(1, 6)))
    reader = ShardReader(lake.uri, None, None, pa.array(["s0-2", "s0-4"]), rows_per_block=8)
    blocks = list(reader({"path": [SHARDS[0], SHARDS[1]]}))
    assert len(blocks) == 1
    assert blocks[0].column("image_id").to_pylist() == ["s0-2", "s0-4"]


# ------------------------------------------------------------------ shard files and the commit
def test_shards_are_written_when_complete_and_the_commit_lists_every_file(lake, lease):
    files = _files()
    batches = [  # rows of two shards interleaved, one failed row; the third shard yields none
        _scored(STEMS[0], ["a", "b"], 3),
        _scored(STEMS[1], ["c"], 2, failed=("c",)),
        _scored(STEMS[0], ["d"], 3),
        _scored(STEMS[1], ["e"], 2),
    ]
    job._write_as_completed(lake, _attempt(files, lease), batches)
    marker = commit(lake, _doc(), files, STEMS, lease, 0.0, started=0.0)
    assert marker["files"] == [layout.run_predictions("", s) for s in STEMS]
    assert marker["error_files"] == [layout.run_errors("", STEMS[1])]
    assert (marker["images"], marker["errors"], marker["committed_by"]) == (4, 1, "j1")
    assert lake.read_json(layout.run_commit("r1")) == marker
    preds = lake.read_parquet(files.predictions(STEMS[0]))
    assert sorted(preds.column("image_id").to_pylist()) == ["a", "b", "d"]
    assert set(preds.column("run_id").to_pylist()) == {"r1"}
    assert "_shard" not in preds.column_names and "error" not in preds.column_names
    assert lake.read_parquet(files.predictions(STEMS[2])).num_rows == 0
    index = lake.read_parquet(layout.scored_index("tiny", 3, "cxr", "r1"))
    assert sorted(index.column("image_id").to_pylist()) == ["a", "b", "d", "e"]
    assert leases.read(lake, "r1") is None  # released once the marker exists
    # what the README's DuckDB recipe reads: the marker's files, as full URIs
    listed = sdk.run_files("r1", lake.uri)
    assert listed["files"] == [f"{lake.uri}/runs/r1/{f}" for f in marker["files"]]
    assert listed["error_files"] == [f"{lake.uri}/runs/r1/{f}" for f in marker["error_files"]]
    lake.write_bytes(f"{layout.run_predictions_dir('r1')}/abandoned.parquet", b"x")
    assert sdk.run_files("r1", lake.uri) == listed  # a file the marker lacks is never read
    with pytest.raises(NotFoundError, match="not committed"):
        sdk.run_files("r2", lake.uri)


def test_a_shard_with_more_rows_than_it_announced_is_refused(lake, lease):
    batches = [_scored(STEMS[0], ["a", "b"], 1)]
    with pytest.raises(RuntimeError, match=f"shard {STEMS[0]}: 2 rows for 1 inputs"):
        job._write_as_completed(lake, _attempt(_files(), lease), batches)


def test_an_incomplete_shard_is_not_written(lake, lease):
    files = _files()
    with pytest.raises(RuntimeError, match="incomplete shards"):
        job._write_as_completed(lake, _attempt(files, lease), [_scored(STEMS[0], ["a"], 2)])
    assert not lake.exists(files.predictions(STEMS[0]))


def test_a_retried_shard_drops_the_errors_file_of_an_earlier_attempt(lake, lease):
    files = _files(date_dir=layout.date_partition("2024-05-01"))
    write_shard(lake, files, STEMS[0], _scored(STEMS[0], ["a", "b"], 2, failed=("b",)),
                frozenset(), lease)
    assert lake.exists(files.errors(STEMS[0]))
    assert files.errors(STEMS[0]).startswith("runs/r1/errors/date=2024-05-01/")
    write_shard(lake, files, STEMS[0], _scored(STEMS[0], ["a", "b"], 2), frozenset(STEMS[:1]),
                lease)
    assert not lake.exists(files.errors(STEMS[0]))


def test_commit_refuses_missing_shards_and_duplicate_ids(lake, lease):
    files = _files()
    write_shard(lake, files, STEMS[0], _scored(STEMS[0], ["a"], 1), frozenset(), lease)
    with pytest.raises(InfraError, match="resume with the same --run-id r1"):
        commit(lake, _doc(), files, STEMS[:2], lease, 0.0, started=0.0)
    write_shard(lake, files, STEMS[1], _scored(STEMS[1], ["a"], 1), frozenset(), lease)
    with pytest.raises(RuntimeError, match="an image has two prediction rows"):
        commit(lake, _doc(), files, STEMS[:2], lease, 0.0, started=0.0)
    assert not lake.exists(layout.run_commit("r1"))


def test_commit_clears_the_inflight_note_and_only_its_own_attempts_temporaries(lake, lease):
    files = _files()
    inflight = layout.scored_inflight_run("tiny", 3, "cxr", "r1")
    lake.write_json(inflight, {"job_id": "j1"})
    preds_dir = layout.run_predictions_dir("r1")
    mine = f"{preds_dir}/{lake.tmp_prefix()}left-by-a-kill"
    theirs = f"{preds_dir}/{lake.tmp_prefix('j7')}of-a-live-attempt"
    lake.write_bytes(mine, b"x")
    lake.write_bytes(theirs, b"x")
    write_shard(lake, files, STEMS[0], None, frozenset(), lease)
    commit(lake, _doc(only_new=True), files, STEMS[:1], lease, 0.0, started=0.0)
    assert not lake.exists(inflight)
    assert lake.list_files(preds_dir) == sorted([files.predictions(STEMS[0]), theirs])
    tidy(lake, layout.run_root("r1"), ["j1"])  # idempotent on a tidy run
    assert lake.exists(theirs)


def test_a_replaced_attempt_writes_nothing_more_and_cannot_commit(lake, lease):
    files = _files()
    write_shard(lake, files, STEMS[0], _scored(STEMS[0], ["a"], 1), frozenset(), lease)
    _take_over(lake)
    with pytest.raises(leases.LeaseLostError, match="job j9 took it over"):
        write_shard(lake, files, STEMS[1], _scored(STEMS[1], ["b"], 1), frozenset(), lease)
    assert not lake.exists(files.predictions(STEMS[1]))
    with pytest.raises(leases.LeaseLostError):
        commit(lake, _doc(), files, STEMS[:1], lease, 0.0, started=0.0)
    assert not lake.exists(layout.run_commit("r1"))
    assert not lake.exists(layout.scored_index("tiny", 3, "cxr", "r1"))


def test_the_commit_marker_is_created_only_if_absent(lake, lease):
    files = _files()
    write_shard(lake, files, STEMS[0], _scored(STEMS[0], ["a"], 1), frozenset(), lease)
    lake.write_json(layout.run_commit("r1"), {"committed_by": "another"})
    with pytest.raises(InfraError, match="another attempt committed it first"):
        commit(lake, _doc(), files, STEMS[:1], lease, 0.0, started=0.0)
    assert lake.read_json(layout.run_commit("r1")) == {"committed_by": "another"}


# ------------------------------------------------------------------ an earlier attempt's files
def _written_run(lake, lease) -> tuple[RunFiles, dict[str, str]]:
    """Shards 0-2 (4 rows each, 2 in the test split) scored, s1-3 failed."""
    files = _files()
    for i, path in enumerate(SHARDS):
        lake.write_parquet(path, shard_table(_shard_rows(i, 4)))
        ids = [f"s{i}-1", f"s{i}-3"]
        write_shard(lake, files, STEMS[i], _scored(STEMS[i], ids, 2,
                                                    failed=("s1-3",) if i == 1 else ()),
                    frozenset(), lease)
    return files, dict(zip(STEMS, SHARDS, strict=True))


def _unsound(lake, shards, choice=resume.RowChoice("test", None, None)) -> set[str]:
    from medray.cluster.score.commit import written

    return resume.unsound(lake, shards, written(lake, layout.run_predictions_dir("r1")),
                          written(lake, layout.run_errors_dir("r1")), choice)


def test_resume_keeps_sound_files_and_rejects_empty_and_wrong_id_files(lake, lease, tmp_path):
    files, shards = _written_run(lake, lease)
    assert _unsound(lake, shards) == set()
    # an OS crash left a zero-length file; another has the right row count but wrong ids
    (tmp_path / "lake" / files.predictions(STEMS[0])).write_bytes(b"")
    good = lake.read_parquet(files.predictions(STEMS[2]))
    wrong = good.set_column(0, "image_id", pa.array(["s2-0", "s2-2"]))
    lake.write_parquet(files.predictions(STEMS[2]), wrong)
    assert _unsound(lake, shards) == {STEMS[0], STEMS[2]}


def test_resume_rejects_duplicates_and_errors_outside_the_runs_rows(lake, lease):
    files, shards = _written_run(lake, lease)
    doubled = lake.read_parquet(files.predictions(STEMS[1]))  # s1-1 (s1-3 is an error row)
    lake.write_parquet(files.predictions(STEMS[1]), pa.concat_tables([doubled, doubled]))
    assert _unsound(lake, shards) == {STEMS[1]}
    # under another row choice (every split) the files lack the train rows
    assert _unsound(lake, shards, resume.RowChoice(None, None, None)) == set(STEMS)
    why = resume.problem(lake, SHARDS[0], files.predictions(STEMS[0]), None,
                         resume.RowChoice("test", pa.array(["s0-1"]), None))
    assert why == "0 expected images missing, 1 unexpected"


# ------------------------------------------------------------------ resume checks
def test_resume_checks_refuse_other_options_and_committed_runs(lake):
    spec = ScoreSpec(dataset="cxr", model="tiny", run_id="r1")
    assert check_resume(lake, ScoreSpec(dataset="cxr", model="tiny")) is None
    assert check_resume(lake, spec) is None  # nothing started yet
    lake.write_json(layout.run_doc("r1"), {**_doc(), "attempts": []})
    assert check_resume(lake, spec.model_copy(update={"batch_size": 8}))["run_id"] == "r1"
    with pytest.raises(InputError, match="started with partition_by='none', not 'date'"):
        check_resume(lake, spec.model_copy(update={"partition_by": "date"}))
    with pytest.raises(InputError, match="scores dataset version 1, not 2"):
        check_resume(lake, spec.model_copy(update={"dataset": "cxr:2"}))
    lake.write_json(layout.run_commit("r1"), {})
    with pytest.raises(InputError, match="'r1' is already committed"):
        check_resume(lake, spec)


def test_start_run_adds_an_attempt_to_a_resumed_run(lake):
    lake.write_json(layout.run_doc("r1"), {**_doc(), "attempts": [{"job_id": "j0"}]})
    ctx = JobContext(job_id="j2", kind="score", submitted_by="t", submitted_at=None)
    doc, resumed = job.start_run(lake, ScoreSpec(dataset="cxr", model="tiny", run_id="r1"), ctx,
                                 "r1")
    assert resumed and [a["job_id"] for a in doc["attempts"]] == ["j0", "j2"]
    assert lake.read_json(layout.run_doc("r1")) == doc


def test_several_scorers_get_both_readers_from_the_start_on_different_nodes():
    one = job._reader_pool(scorers=1, shards=5)
    assert (one["compute"].min_size, one["compute"].max_size) == (1, 2)
    assert "scheduling_strategy" not in one
    several = job._reader_pool(scorers=2, shards=5)
    assert (several["compute"].min_size, several["compute"].max_size) == (2, 2)
    assert several["scheduling_strategy"] == "SPREAD"
    assert job._reader_pool(scorers=2, shards=1)["compute"].max_size == 1
    assert one["num_cpus"] == several["num_cpus"] == 0
