"""Grad-CAM heatmaps for the report: pick the top-scored images per label, start one Ray task
that loads the run's model once and draws their overlays, and write the PNGs into the report.

The task starts before the metrics are computed, so that its TensorFlow import and model load
overlap them; ``finish`` waits for it afterwards.
"""

from __future__ import annotations

import logging
from typing import Any

from medray.cluster.report import inputs, remote
from medray.cluster.store import layout
from medray.cluster.store.lake import Lake
from medray.workers.errors import NotFoundError
from medray.workers.models import ModelCard
from medray.workers.run_data import RunData, top_images

log = logging.getLogger(__name__)

# What the heatmaps table leaves out of a task result: the image itself, an internal index.
_NOT_IN_TABLE = ("png", "label_index")


def start(lake: Lake, marker: dict[str, Any], card: ModelCard, cur: RunData, k: int,
          layer: str | None = None) -> Any | None:
    """Submit the Grad-CAM task for the top-``k`` images per label of the run whose commit
    marker is ``marker``; returns its ObjectRef, or None when there is nothing to draw."""
    picks = top_images(cur, k)
    if not picks:
        return None
    shards = inputs.shard_paths(lake, marker)
    if shards is None:
        raise NotFoundError(f"dataset {marker['dataset']}:{marker['dataset_version']} is gone, "
                            "so there are no pixels for heatmaps; run without --heatmaps")
    requests: dict[str, list[str]] = {}
    payload = []
    for j, rank, row in picks:
        image = str(cur.image_id[row])
        stem = layout.prediction_stem(marker["files"][int(cur.file_index[row])])
        wanted = requests.setdefault(shards[stem], [])
        if image not in wanted:
            wanted.append(image)
        payload.append({"label": cur.labels[j], "label_index": j, "rank": rank,
                        "image_id": image, "score": float(cur.scores[row, j])})
    task = remote.as_task(remote.heatmaps, num_cpus=1)
    return task.remote(lake, card, requests, payload, layer)


def finish(lake: Lake, run_id: str, ref: Any | None) -> tuple[list[dict[str, Any]], str | None]:
    """Wait for the Grad-CAM task and write its PNGs into the run's report: (one dict per
    overlay (label, rank, image_id, score, png, layer, uri), the line saying why there are
    none when the model could not be explained)."""
    import ray

    if ref is None:
        return [], None
    done: dict[str, Any] = ray.get(ref)
    results: list[dict[str, Any]] = done["results"]
    for r in results:
        rel = layout.run_report_heatmap(run_id, r["label"], r["rank"], r["image_id"])
        lake.write_bytes(rel, r["png"])
        r["uri"] = lake.full_uri(rel)
    log.info("wrote %d Grad-CAM overlays (layer %s)", len(results),
             results[0]["layer"] if results else "-")
    return results, done.get("note")


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the report's heatmaps table: which images, their scores and PNGs' URIs."""
    return [{k: v for k, v in r.items() if k not in _NOT_IN_TABLE} for r in results]
