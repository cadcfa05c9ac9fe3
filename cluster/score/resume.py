"""What a resumed attempt trusts of the files an earlier attempt wrote.

A prediction file is written last for its shard, atomically (an S3 PUT, or an fsynced rename
on a local disk), so its existence should mean the shard is done. It is still checked before
it is kept, because a disk can lose what an OS crash interrupted and a file can be replaced by
hand: its Parquet footer must read, its image ids must be distinct and equal to the rows the
run selects from the shard (split, --only-new, --retry-failed: the reader's own rule) less the
shard's error rows, and every error row must be one of those rows. A file that fails is scored
again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa

from medray.cluster.score.remote import rows_wanted
from medray.cluster.store.lake import Lake

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowChoice:
    """Which rows of a shard a run scores (frozen in run.json, so every attempt agrees)."""

    split: str | None
    skip: pa.Array | None  # --only-new: ids the baseline's committed runs scored
    only: pa.Array | None  # --retry-failed: ids that failed in that run


def _ids(lake: Lake, path: str) -> list[str]:
    return [str(i) for i in lake.read_parquet(path, columns=["image_id"]).column(0).to_pylist()]


def problem(lake: Lake, shard: str, predictions: str, errors: str | None,
            choice: RowChoice) -> str | None:
    """Why the prediction file of ``shard`` cannot be kept (None: it is sound)."""
    try:
        got = _ids(lake, predictions)
        failed = _ids(lake, errors) if errors else []
    except (pa.ArrowException, OSError) as exc:  # an empty or truncated file, a bad footer
        return f"unreadable ({type(exc).__name__}: {str(exc)[:120]})"
    keys = lake.read_parquet(shard, columns=["image_id", "split"])
    wanted = set(keys.column("image_id").filter(rows_wanted(keys, choice.split, choice.skip,
                                                            choice.only)).to_pylist())
    if len(got) != len(set(got)):
        return f"{len(got) - len(set(got))} duplicated image ids"
    if not set(failed) <= wanted:
        return "its errors file names images the run does not score"
    expected = wanted - set(failed)
    if set(got) != expected:
        return (f"{len(expected - set(got))} expected images missing, "
                f"{len(set(got) - expected)} unexpected")
    return None


def unsound(lake: Lake, shards: dict[str, str], predictions: dict[str, str],
            errors: dict[str, str], choice: RowChoice) -> set[str]:
    """Stems (of ``shards``: stem -> shard path) whose existing prediction file is not what
    scoring the shard would write; ``predictions``/``errors``: stem -> the run's file."""
    bad = set()
    for stem, path in sorted(predictions.items()):
        if stem not in shards:
            continue  # not a shard of this run's dataset version: the commit ignores it
        why = problem(lake, shards[stem], path, errors.get(stem), choice)
        if why:
            log.warning("shard %s: the prediction file an earlier attempt wrote is %s: "
                        "scoring the shard again", stem, why)
            bad.add(stem)
    return bad
