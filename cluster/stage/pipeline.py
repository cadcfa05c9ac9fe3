"""The stage job's Ray Data pipeline: a listing in, decoded batches out, in listing order.

Items travel in blocks of about ``BLOCK_BYTES`` of decoded output, decoded blocks wait for the
shard writer within a fixed object-store budget, and one decoder actor runs per CPU. A .npz is
first expanded into item rows by ``remote.read_npz_member`` tasks, one per array.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.stage.listing import Listing
from medray.cluster.stage.npz_source import NPZ_CHUNK
from medray.cluster.stage.remote import BatchDecoder, DecodeOptions, read_npz_member
from medray.workers.specs import StageSpec

BLOCK_BYTES = 16 * 1024 * 1024
# object store budget of a staging job's pipeline: a few blocks per decoder in flight
STAGE_STORE_BYTES = 256 * 1024 * 1024
UNKNOWN_ORIGINAL_BYTES = 1e6  # what a kept original is taken to weigh when no size is listed


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
    decoded = ds.map_batches(
        BatchDecoder, fn_constructor_args=(spec, options), batch_size=batch,
        batch_format="pyarrow", num_cpus=1,
        # Ray Data restarts a dead actor and retries its batch (max_restarts and
        # max_task_retries -1): the crash guard then skips the input that killed it
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers, initial_size=workers),
    ).iter_batches(batch_format="pyarrow", batch_size=None)
    return cast("Iterable[pa.Table]", decoded)  # batch_format="pyarrow": Arrow tables only
