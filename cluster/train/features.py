"""The head-mode feature cache: backbone features computed once per shard, kept in the lake.

``--mode head`` without augmentation trains only the classifier; the frozen backbone gives the
same features every epoch and every training, so Ray Data actors compute them once per shard
into ``features/<arch>-<key>/...`` and the next head training reads those small vectors
instead of images. The key hashes everything that changes the features (arch, input size,
channels, weights identity, Keras version, and the seed for random weights). A JSON marker
written after each feature file is its commit point.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.cluster.train.data import COLUMNS, pixels
from medray.cluster.train.weights import InitWeights, ModelShape, initial_model
from medray.workers.specs import TrainSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureCache:
    """The cache one training reads: its files (one per shard) and what was computed now."""

    key: str
    uri: str
    computed_shards: int
    reused_shards: int
    files: tuple[str, ...]
    dim: int

    def summary(self) -> dict[str, Any]:
        """What the model card and the job result say about the cache."""
        return {"key": self.key, "uri": self.uri, "computed_shards": self.computed_shards,
                "reused_shards": self.reused_shards}


class FeatureWriter:
    """Ray Data UDF (an actor): one shard -> one Parquet file of backbone features.

    Columns: image_id, split, labels, features (fixed-size list of float32). The JSON marker
    written after the file says who computed it and when.
    """

    def __init__(self, lake_uri: str, key: str, init: InitWeights, shape: ModelShape,
                 job_id: str, batch_size: int = 64) -> None:
        from medray.workers.models import configure_tensorflow, feature_extractor

        configure_tensorflow()
        self.lake, self.key, self.job_id, self.batch = Lake(lake_uri), key, job_id, batch_size
        model, _ = initial_model(self.lake, init, shape)
        self.extract = feature_extractor(model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"shard": [], "rows": [], "seconds": []}
        for path in batch["path"]:
            t0 = time.monotonic()
            rows, dim = self._write(str(path))
            seconds = time.monotonic() - t0
            rel = layout.feature_file(self.key, str(path))
            self.lake.write_json(layout.feature_marker(rel), {
                "shard": str(path), "rows": rows, "dim": dim, "job_id": self.job_id,
                "computed_at": datetime.now(UTC).isoformat(), "seconds": round(seconds, 3)})
            out["shard"].append(str(path))
            out["rows"].append(rows)
            out["seconds"].append(seconds)
        return out

    def _write(self, shard: str) -> tuple[int, int]:
        """Compute and write the features of one shard: (rows, feature size)."""
        table = self.lake.read_parquet(shard, columns=["image_id", *COLUMNS])
        feats = []
        for start in range(0, table.num_rows, self.batch):
            x = pixels(table.slice(start, self.batch)).astype(np.float32)
            feats.append(np.asarray(self.extract(x, training=False), np.float32))
        flat = np.concatenate(feats) if feats else np.zeros((0, 1), np.float32)
        dim = int(flat.shape[1])
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), dim)
        self.lake.write_parquet(layout.feature_file(self.key, shard), pa.table({
            "image_id": table.column("image_id"), "split": table.column("split"),
            "labels": table.column("labels"), "features": column}))
        return table.num_rows, dim


def ensure_features(lake: Lake, spec: TrainSpec, shape: ModelShape, init: InitWeights,
                    shards: list[str], job_id: str) -> FeatureCache:
    """Compute (once) the features of every shard not yet in the cache, in parallel Ray Data
    actors sized like the training workers; say which were computed now and which reused."""
    import keras
    import ray

    from medray.workers.training import feature_key

    key, covers = feature_key(shape.arch, shape.image_size, shape.channels, init.identity,
                              shape.seed, keras.__version__)
    base = layout.features_root(key)
    if not lake.exists(layout.features_key(key)):
        lake.write_json(layout.features_key(key), covers)
    todo = [p for p in shards
            if not lake.exists(layout.feature_marker(layout.feature_file(key, p)))]
    if todo:
        log.info("computing %s features for %d of %d shards (cache %s)", shape.arch, len(todo),
                 len(shards), lake.full_uri(base))
        ds = ray.data.from_items([{"path": p} for p in todo],
                                 override_num_blocks=len(todo)).map_batches(
            FeatureWriter, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"lake_uri": lake.uri, "key": key, "init": init,
                                   "shape": shape, "job_id": job_id},
            compute=ray.data.ActorPoolStrategy(min_size=1,
                                               max_size=max(1, min(len(todo), spec.workers))),
            num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker or None)
        computed = [{"shard": r["shard"], "rows": int(r["rows"]), "seconds": float(r["seconds"])}
                    for r in ds.take_all()]
        lake.write_json(layout.features_event(key, job_id), {
            "job_id": job_id, "at": datetime.now(UTC).isoformat(), "computed": computed})
    else:
        log.info("all %d shards have cached %s features: the backbone does not run",
                 len(shards), shape.arch)
    files = tuple(layout.feature_file(key, p) for p in shards)
    dim = int(lake.read_json(layout.feature_marker(files[0]))["dim"])
    return FeatureCache(key, lake.full_uri(base), len(todo), len(shards) - len(todo), files, dim)
