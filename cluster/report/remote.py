"""What Ray runs for the report job in other processes: the reader of one prediction file, the
reader of one dataset shard's patient keys, a pure worker call (the metrics of one label) and
the Grad-CAM task.

All are plain functions; ``as_task`` applies ``ray.remote`` with the report's retry rule where
the job spawns them. Each sets up job logging first, since a Ray worker process starts without
medray's handler.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.infra import logs
from medray.cluster.store import registry
from medray.cluster.store.lake import Lake
from medray.workers.errors import InfraError, MedrayError, NotFoundError
from medray.workers.models import ModelCard
from medray.workers.run_data import Part, attribute_json, prediction_columns, summarize
from medray.workers.shards import decode_pixels

log = logging.getLogger(__name__)
# Columns of a dataset shard that the heatmaps need to rebuild an image.
_PIXEL_COLUMNS = ["image_id", "height", "width", "channels", "pixels"]
# Shard columns that are not patient attributes (``metadata`` is opened into its keys).
_NOT_ATTRIBUTES = {"image_id", "source_uri", "labels", "patient_key", "split", "height", "width",
                   "channels", "pixels", "orig_height", "orig_width", "format", "original"}


def as_task(fn: Callable[..., Any], num_cpus: float) -> Any:
    """``fn`` as a Ray remote function. Storage hiccups (``InfraError``) are worth a retry;
    bad input is not."""
    import ray

    # Ray's stubs type retry_exceptions as bool; a list of exception classes is documented.
    decorator: Any = ray.remote(  # type: ignore[call-overload]
        max_retries=3, retry_exceptions=[InfraError], num_cpus=num_cpus)
    return decorator(fn)


def read_part(lake: Lake, rel: str, index: int, labels: list[str], thresholds: list[float],
              keep_all: bool) -> Part:
    """One prediction file -> its ``Part``, reading only the columns the report uses."""
    logs.configure()
    table = lake.read_parquet(rel, columns=prediction_columns(labels))
    return summarize(table, labels, thresholds, keep_all, index)


def _columns(lake: Lake, rel: str) -> list[str]:
    """The column names of a Parquet file in the lake, from its footer."""
    import pyarrow.parquet as pq

    return list(pq.read_schema(lake.path(rel), filesystem=lake.fs).names)


def read_keys(lake: Lake, rel: str, split: str | None, attributes: bool = False) -> pa.Table:
    """(image_id, patient_key) of one dataset shard's images of ``split``, null keys included;
    with ``attributes`` also each row's patient attributes as one JSON object per row
    (``attributes``): the keys of its ``metadata`` and any attribute columns staging kept."""
    logs.configure()
    names = _columns(lake, rel) if attributes else []
    extra = [c for c in names if c not in _NOT_ATTRIBUTES] if attributes else []
    cols = ["image_id", "patient_key", *extra, *(["split"] if split else [])]
    table = lake.read_parquet(rel, columns=cols)
    if split:
        table = table.filter(pc.equal(table.column("split"), split)).drop_columns(["split"])
    if attributes:
        rows = table.select(extra).to_pylist() if extra else [{}] * table.num_rows
        table = table.select(["image_id", "patient_key"]).append_column(
            "attributes", pa.array([attribute_json(r) for r in rows], pa.string()))
    return table


def call(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """``fn(**kwargs)`` for a pure worker function, with job logging set up."""
    logs.configure()
    return fn(**kwargs)


def heatmaps(lake: Lake, card: ModelCard, requests: dict[str, list[str]],
             picks: list[dict[str, Any]], layer: str | None = None) -> dict[str, Any]:
    """Grad-CAM overlays of the picked images, with the run's model loaded once.

    ``requests`` maps a dataset shard to the image ids to read from it; each pick (label,
    label_index, rank, image_id, score) comes back in ``results`` with its ``png`` and the
    ``layer`` mapped. A model Grad-CAM cannot explain gives no results and ``note``, one line
    saying why: the report goes on without heatmaps rather than failing.
    """
    logs.configure()
    try:
        return {"results": _overlays(lake, card, requests, picks, layer), "note": None}
    except InfraError:
        raise  # storage trouble: Ray retries the task
    except Exception as exc:  # noqa: BLE001 - any model a user brings; the report goes on
        note = f"no heatmaps: {exc.message if isinstance(exc, MedrayError) else exc}"
        if not isinstance(exc, MedrayError):
            note = f"no heatmaps: Grad-CAM failed on this model ({type(exc).__name__}: " \
                   f"{str(exc)[:200]}); try --heatmap-layer with a convolutional layer"
        log.warning("%s", note)
        return {"results": [], "note": note}


def _overlays(lake: Lake, card: ModelCard, requests: dict[str, list[str]],
              picks: list[dict[str, Any]], layer: str | None) -> list[dict[str, Any]]:
    from medray.workers.gradcam import GradCam, overlay_pngs
    from medray.workers.models import configure_tensorflow, load_model

    configure_tensorflow()
    # A throwaway folder rather than the shared model cache: the file is needed only until
    # the model is loaded, and a report leaves no copy of it on the node.
    cache = tempfile.mkdtemp(prefix="medray-gradcam-")
    try:
        model = load_model(registry.fetch(lake, card, cache_dir=cache))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    cam = GradCam(model, layer)
    pixels: dict[str, np.ndarray] = {}
    for rel, ids in requests.items():
        table = lake.read_parquet(rel, columns=_PIXEL_COLUMNS)
        table = table.filter(pc.is_in(table.column("image_id"), pa.array(ids, pa.string())))
        for r in table.to_pylist():
            pixels[r["image_id"]] = decode_pixels(r["pixels"], r["height"], r["width"],
                                                  r["channels"])
    missing = sorted({p["image_id"] for p in picks} - set(pixels))
    if missing:
        raise NotFoundError(f"{len(missing)} scored images are not in their dataset shards "
                            f"(e.g. {missing[0]}): was the dataset version rewritten?")
    out = []
    for p in picks:
        (png,) = overlay_pngs(cam, pixels[p["image_id"]][None], p["label_index"])
        out.append({**p, "png": png, "layer": cam.layer_name})
    return out
