"""What the report reads, in parallel Ray tasks: a committed run's prediction files (one task
each, merged as they finish) and the patient keys of the dataset shards the run scored.

A run is read only through the files its commit marker lists (``runs.read_commit``); a
prediction file is matched to its dataset shard by name (``layout.prediction_stem``).
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from medray.cluster.report import remote
from medray.cluster.store import catalog, layout
from medray.cluster.store.lake import Lake
from medray.workers.errors import NotFoundError
from medray.workers.run_data import RunData, combine, operating_thresholds

log = logging.getLogger(__name__)

# Reading is mostly waiting on storage: four readers share a core.
_READER_CPUS = 0.25


def gather(refs: list[Any]) -> list[Any]:
    """Results in completion order, so the driver merges while other tasks still run."""
    import ray

    out: list[Any] = []
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        out.extend(ray.get(done))
    return out


def thresholds(marker: dict[str, Any]) -> tuple[list[float], list[str]]:
    """(threshold, source) per label of a run, from its commit marker."""
    return operating_thresholds(marker["labels"], marker.get("thresholds"))


def load_run(lake: Lake, run_id: str, marker: dict[str, Any], keep_all: bool) -> RunData:
    """A committed run's ``RunData``: one Ray task per prediction file.

    ``keep_all`` keeps every row (drift, comparison and heatmaps need them), not only the rows
    with ground truth."""
    labels = list(marker["labels"])
    values, _ = thresholds(marker)
    task = remote.as_task(remote.read_part, num_cpus=_READER_CPUS)
    parts = gather([task.remote(lake, layout.run_file(run_id, f), i, labels, values, keep_all)
                    for i, f in enumerate(marker["files"])])
    data = combine(parts, labels, values)
    if data.dropped:
        log.warning("run %s: %d rows without a finite score were left out", run_id,
                    data.dropped)
    log.info("run %s: %d files, %d images, %d with ground truth", run_id, len(parts),
             data.images, data.with_truth)
    return data


def shard_paths(lake: Lake, marker: dict[str, Any]) -> dict[str, str] | None:
    """Prediction-file stem -> dataset shard path of a run, or None when the dataset is gone."""
    try:
        manifest = catalog.manifest(lake, marker["dataset"], int(marker["dataset_version"]))
    except NotFoundError:
        return None
    return {layout.shard_stem(s["path"]): s["path"] for s in manifest["shards"]}


def load_patient_keys(lake: Lake, marker: dict[str, Any], attributes: bool = False
                      ) -> pa.Table | None:
    """(image_id, patient_key[, attributes]) of the run's dataset shards, read in parallel;
    None if the dataset is gone. ``attributes`` adds each image's patient attributes as JSON
    (``workers/run_data.attribute_json``)."""
    shards = shard_paths(lake, marker)
    if shards is None:
        log.warning("dataset %s:%s is gone: CIs resample images", marker["dataset"],
                    marker["dataset_version"])
        return None
    stems = [layout.prediction_stem(f) for f in marker["files"]]
    task = remote.as_task(remote.read_keys, num_cpus=_READER_CPUS)
    tables = gather([task.remote(lake, shards[s], marker.get("split"), attributes)
                     for s in stems if s in shards])
    return pa.concat_tables(tables) if tables else None
