"""A score run's files: one prediction file (and an errors file when rows failed) per input
shard, then the scored-images index, the commit marker that makes the run visible, and tidying.

Exactly once rests on two orders and a lease. In a shard, errors are written first and
predictions last, so a prediction file means the shard is complete and a resumed attempt
checks it (``resume.py``) and keeps it. In a run, the index is written before the marker and
counts only once the marker exists, so --only-new never trusts an uncommitted run. Every write
here first checks that this attempt still holds the run's lease (``store/leases.py``), and the
marker is created only if absent, so a run is committed once, by one attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.store import atomic, layout
from medray.cluster.store.lake import Lake, json_bytes
from medray.cluster.store.leases import Lease
from medray.workers.errors import InfraError
from medray.workers.scorer import prediction_schema
from medray.workers.shards import error_table, now_utc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFiles:
    """Where one run's shard files go, and what each of its prediction rows is stamped with."""

    run_id: str
    model: str
    model_version: int
    labels: tuple[str, ...]  # the model's: the columns of a shard file with no rows
    date_dir: str  # "date=YYYY-MM-DD/" under --partition-by date, else ""

    def predictions(self, stem: str) -> str:
        return layout.run_file(self.run_id, layout.run_predictions(self.date_dir, stem))

    def errors(self, stem: str) -> str:
        return layout.run_file(self.run_id, layout.run_errors(self.date_dir, stem))


def written(lake: Lake, folder: str) -> dict[str, str]:
    """Shard stem -> lake path of the finished files under ``folder`` (temporaries skipped)."""
    out = {}
    for f in lake.list_files(folder, recursive=True):
        name = f.rsplit("/", 1)[-1]
        if name.endswith(".parquet") and not name.startswith("."):
            out[name.removesuffix(".parquet")] = f
    return out


def write_shard(lake: Lake, files: RunFiles, stem: str, table: pa.Table | None,
                stale_errors: frozenset[str], lease: Lease) -> None:
    """Write one shard's scored rows (None: the shard had no row to score).

    ``stale_errors`` are the shards with an errors file from an earlier attempt: when this
    attempt scores all of a shard's rows, that file must not survive. Nothing is written once
    ``lease`` is lost (LeaseLostError).
    """
    if table is None:
        preds = prediction_schema(list(files.labels)).empty_table().drop_columns(["error"])
        failed_rows: list[dict[str, Any]] = []
    else:
        table = table.drop_columns(["_shard", "_shard_rows"])
        failed = pc.invert(pc.is_null(table.column("error")))
        failed_rows = [{"source_uri": r["source_uri"], "image_id": r["image_id"],
                        "error_type": r["error"].split(":", 1)[0], "message": r["error"],
                        "stage": "score"}
                       for r in table.filter(failed).select(["source_uri", "image_id", "error"])
                       .to_pylist()]
        preds = table.filter(pc.invert(failed)).drop_columns(["error"])
    n = preds.num_rows
    preds = preds.append_column("model", pa.array([files.model] * n, pa.string()))
    preds = preds.append_column("model_version", pa.array([files.model_version] * n, pa.int32()))
    preds = preds.append_column("run_id", pa.array([files.run_id] * n, pa.string()))
    preds = preds.append_column("scored_at", pa.array([now_utc()] * n,
                                                      pa.timestamp("us", tz="UTC")))
    lease.check()
    if failed_rows:
        lake.write_parquet(files.errors(stem), error_table(failed_rows))
    elif stem in stale_errors:
        lake.delete(files.errors(stem))
    lease.check()
    lake.write_parquet(files.predictions(stem), preds)
    log.info("shard %s: %d predictions, %d errors written", stem, n, len(failed_rows))


def commit(lake: Lake, doc: dict[str, Any], files: RunFiles, stems: Iterable[str], lease: Lease,
           gpus: float, started: float) -> dict[str, Any]:
    """Index and commit a run whose every shard ``stems`` names has a prediction file.

    ``doc`` is the run's run.json and ``started`` the attempt's ``time.monotonic()`` start;
    returns the commit marker. The lease is checked before the index and the marker, the
    marker is created only if absent, and the lease is released once the marker exists.
    """
    lease.check()
    run_id = files.run_id
    base = layout.run_root(run_id)
    stems = list(stems)
    preds = written(lake, layout.run_predictions_dir(run_id))
    missing = sorted(set(stems) - set(preds))
    if missing:
        raise InfraError(f"run {run_id}: prediction files missing for {missing[:5]}; resume "
                         f"with the same --run-id {run_id}")
    # the marker lists paths relative to the run's folder
    pred_files = sorted(preds[s][len(base) + 1:] for s in stems)
    errors = written(lake, layout.run_errors_dir(run_id))
    error_files = sorted(errors[s][len(base) + 1:] for s in stems if s in errors)
    ids = pa.chunked_array([lake.read_parquet(layout.run_file(run_id, f),
                                              columns=["image_id"]).column(0)
                            for f in pred_files], pa.string())
    if pc.count_distinct(ids).as_py() != len(ids):
        raise RuntimeError(f"run {run_id}: an image has two prediction rows; not committing")
    n_errors = sum(lake.read_parquet(layout.run_file(run_id, f), columns=["image_id"]).num_rows
                   for f in error_files)
    actors = [lake.read_json(f) for f in lake.list_files(layout.run_actors_dir(run_id))
              if f.endswith(".json") and not f.rsplit("/", 1)[-1].startswith(".")]
    lease.check()
    lake.write_parquet(layout.scored_index(files.model, files.model_version, doc["dataset"],
                                           run_id),
                       pa.table({"image_id": ids}))
    marker = {**doc, "files": pred_files, "error_files": error_files, "images": len(ids),
              "errors": n_errors, "actors": actors, "gpus_per_actor": gpus,
              "committed_at": now_utc().isoformat(), "committed_by": lease.owner,
              "replaced_attempts": lease.doc.get("replaced", []),
              "seconds": round(time.monotonic() - started, 2)}
    lease.check()
    if not atomic.create_if_absent(lake, layout.run_commit(run_id), json_bytes(marker)):
        raise InfraError(f"run {run_id}: another attempt committed it first; this attempt "
                         "(which held the lease until now) leaves the committed run as it is")
    lease.release()
    if doc["only_new"]:
        lake.delete(layout.scored_inflight_run(files.model, files.model_version, doc["dataset"],
                                               run_id))
    tidy(lake, base, [lease.owner, *lease.replaced_owners()])
    return marker


def tidy(lake: Lake, folder: str, attempts: Iterable[str]) -> None:
    """Remove the temporaries that ``attempts`` (this job and the dead ones whose lease it
    took over) left in a local lake; another attempt's are never touched. S3 PUTs leave
    none."""
    prefixes = tuple(lake.tmp_prefix(a) for a in attempts if a)
    if not lake.is_local or not prefixes:
        return
    for f in lake.list_files(folder, recursive=True):
        if f.rsplit("/", 1)[-1].startswith(prefixes):
            lake.delete(f)
