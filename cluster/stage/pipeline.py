"""The stage job's Ray Data pipeline: a listing in, decoded batches out, in listing order.

Items travel in blocks of about ``BLOCK_BYTES`` of decoded output, decoded blocks wait for the
shard writer within a fixed object-store budget, and one decoder actor runs per CPU. A .npz is
first expanded into item rows by ``remote.read_npz_member`` tasks, one per array.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.stage.listing import Listing
from medray.cluster.stage.npz_source import NPZ_CHUNK, read_npz_member
from medray.cluster.stage.remote import BatchDecoder, DecodeOptions
from medray.workers.shards import parse_max_errors
from medray.workers.specs import StageSpec

BLOCK_BYTES = 16 * 1024 * 1024
# object store budget of a staging job's pipeline: a few blocks per decoder in flight
STAGE_STORE_BYTES = 256 * 1024 * 1024
UNKNOWN_ORIGINAL_BYTES = 1e6  # what a kept original is taken to weigh when no size is listed
# Ray Data retries a dead task and restarts a dead actor without end by default: a poison
# input would loop forever. Bounded here; each input that kills a decoder costs one restart
# (the crash guard turns it into an errors row), so more than --max-errors of them fail anyway.
MAX_DECODER_RESTARTS = 32
NPZ_READ_RETRIES = 2  # a streaming inflate has bounded memory: a retry is for a lost node


def retry_bounds(spec: StageSpec, inputs: int) -> dict[str, int]:
    """Ray remote args that bound the decoder actors' restarts and their batches' retries."""
    allowed = parse_max_errors(spec.max_errors, inputs)
    bound = min(MAX_DECODER_RESTARTS, allowed + 1)
    return {"max_restarts": bound, "max_task_retries": bound}


def items_per_block(n_items: int, batch: int, workers: int, bytes_per_item: float) -> int:
    """Items per Ray Data block: large blocks (about BLOCK_BYTES of decoded output) keep the
    per-block costs of the driver and Ray low; at least 8 blocks a worker keep them balanced."""
    by_size = int(BLOCK_BYTES // max(1.0, bytes_per_item))
    by_balance = math.ceil(n_items / max(1, 8 * workers))
    return max(batch, min(by_size, by_balance, 8192))


def decoded_batches(listing: Listing, spec: StageSpec,
                    options: DecodeOptions) -> Iterable[pa.Table]:
    """Decoded rows (``remote.OUT_SCHEMA``) of every listed input, streamed in listing order."""
    import ray

    if isinstance(options.known, np.ndarray):  # one copy in the object store for every decoder
        options = dataclasses.replace(options, known=ray.put(options.known))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # first copy of a duplicate wins, every time
    # Decoded blocks wait in the object store until the shard writer takes them. A fixed budget
    # (Ray Data's default is a share of the node's store, which a big collection fills) keeps
    # the memory of staging flat however large the collection is.
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=STAGE_STORE_BYTES)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    batch = spec.decode_batch
    if listing.format == "npz":
        ds = ray.data.from_arrow(listing.items).map_batches(
            read_npz_member, batch_size=1, batch_format="pyarrow",
            compute=ray.data.TaskPoolStrategy(size=max(1, listing.items.num_rows)),
            max_retries=NPZ_READ_RETRIES,
            num_cpus=0)  # streaming inflate: light next to decoding, must not take a decoder CPU
        batch, batches = NPZ_CHUNK, math.ceil(listing.inputs / NPZ_CHUNK)
    else:
        n = listing.items.num_rows
        per_item: float = spec.image_size ** 2 * spec.channels + 512
        if spec.keep_original:
            sizes = listing.items.column("size")
            per_item += (float(pc.mean(sizes).as_py() or 0) if sizes.null_count < n
                         else UNKNOWN_ORIGINAL_BYTES)
        step = items_per_block(n, batch, cpus, per_item)
        # take() copies: a slice would pickle the whole table's buffers into every block
        ds = ray.data.from_arrow([listing.items.take(np.arange(i, min(n, i + step)))
                                  for i in range(0, n, step)])
        batches = math.ceil(n / batch)
    workers = min(cpus, max(1, batches))
    bounds = retry_bounds(spec, listing.inputs)
    decoded = ds.map_batches(
        BatchDecoder, fn_constructor_args=(spec, options), batch_size=batch,
        batch_format="pyarrow", num_cpus=1,
        # a restarted actor retries its batch; the crash guard then skips the input that
        # killed it (an errors row); restarts and retries are bounded (retry_bounds)
        max_restarts=bounds["max_restarts"], max_task_retries=bounds["max_task_retries"],
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers, initial_size=workers),
    ).iter_batches(batch_format="pyarrow", batch_size=None)
    return cast("Iterable[pa.Table]", decoded)  # batch_format="pyarrow": Arrow tables only
