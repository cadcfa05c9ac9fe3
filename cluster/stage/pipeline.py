"""The stage job's decode pipeline: a listing in, decoded batches out, in listing order.

One decoder actor (``remote.BatchDecoder``) runs per CPU. Items go to them in chunks of about
``BLOCK_BYTES`` of decoded output, each to the decoder with the fewest queued, ``IN_FLIGHT``
chunks a decoder in all, and the decoded chunks come back in the order they went out (the first
copy of a duplicate wins, every time). So at most decoders x ``IN_FLIGHT`` decoded chunks wait
in the object store, however large the collection. A .npz is first expanded into item chunks by
``npz_source.read_npz_member`` tasks, one member at a time, held back by the same bound.

Plain Ray actors and tasks, not Ray Data: on a small cluster Ray Data's start-up (its import,
its own helper actors, planning) took longer than decoding thousands of images, and its
per-block bookkeeping ran in the driver (issue 17; BENCHMARKS.md "Staging").
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medray.cluster.stage.listing import Listing
from medray.cluster.stage.npz_source import NPZ_CHUNK, read_npz_member
from medray.cluster.stage.remote import BatchDecoder, DecodeOptions
from medray.workers.shards import parse_max_errors
from medray.workers.specs import StageSpec

BLOCK_BYTES = 16 * 1024 * 1024
IN_FLIGHT = 2  # chunks queued per decoder: one decoding, one waiting, so none idles
FIRST_CHUNKS = 2  # the first chunks are small, so the first decoded rows come back soon
UNKNOWN_ORIGINAL_BYTES = 1e6  # what a kept original is taken to weigh when no size is listed
# A dead decoder is restarted and its calls retried, a dead .npz task retried; without a bound a
# poison input would loop forever. Each input that kills a decoder costs one restart (the crash
# guard turns it into an errors row), so more than --max-errors of them fail anyway.
MAX_DECODER_RESTARTS = 32
NPZ_READ_RETRIES = 2  # a streaming inflate has bounded memory: a retry is for a lost node


def retry_bounds(spec: StageSpec, inputs: int) -> dict[str, int]:
    """Ray remote args that bound the decoder actors' restarts and their calls' retries."""
    allowed = parse_max_errors(spec.max_errors, inputs)
    bound = min(MAX_DECODER_RESTARTS, allowed + 1)
    return {"max_restarts": bound, "max_task_retries": bound}


def items_per_block(n_items: int, batch: int, workers: int, bytes_per_item: float) -> int:
    """Items per chunk: large chunks (about BLOCK_BYTES of decoded output) keep the per-call
    costs low; at least 8 chunks a worker keep them balanced."""
    by_size = int(BLOCK_BYTES // max(1.0, bytes_per_item))
    by_balance = math.ceil(n_items / max(1, 8 * workers))
    return max(batch, min(by_size, by_balance, 8192))


def chunk_bounds(n_items: int, step: int, batch: int, workers: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``n_items``: ``step`` items each, but the first
    ``FIRST_CHUNKS`` per worker of one decoding batch, so no decoder waits a whole chunk for its
    first rows to go out."""
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < n_items:
        size = batch if len(bounds) < FIRST_CHUNKS * workers else step
        bounds.append((start, min(n_items, start + size)))
        start += size
    return bounds


def decoded_batches(listing: Listing, spec: StageSpec,
                    options: DecodeOptions) -> Iterator[pa.Table]:
    """Decoded rows (``remote.OUT_SCHEMA``) of every listed input, streamed in listing order."""
    import ray

    if isinstance(options.known, np.ndarray):  # one copy in the object store for every decoder
        options = dataclasses.replace(options, known=ray.put(options.known))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    if listing.format == "npz":
        workers = min(cpus, max(1, math.ceil(listing.inputs / NPZ_CHUNK)))
        chunks: Iterable[Any] = _npz_chunks(listing.items, workers)
    else:
        n = listing.items.num_rows
        per_item: float = spec.image_size ** 2 * spec.channels + 512
        if spec.keep_original:
            sizes = listing.items.column("size")
            per_item += (float(pc.mean(sizes).as_py() or 0) if sizes.null_count < n
                         else UNKNOWN_ORIGINAL_BYTES)
        step = items_per_block(n, spec.decode_batch, cpus, per_item)
        workers = min(cpus, max(1, math.ceil(n / spec.decode_batch)))
        # take() copies: a slice would ship the whole listing's buffers with every chunk
        chunks = (listing.items.take(np.arange(a, b))
                  for a, b in chunk_bounds(n, step, spec.decode_batch, workers))
    # a restarted decoder retries its calls; the crash guard then skips the input that killed
    # it (an errors row); restarts and retries are bounded (retry_bounds)
    bounds = retry_bounds(spec, listing.inputs)
    decoder: Any = ray.remote(num_cpus=1, max_restarts=bounds["max_restarts"],
                              max_task_retries=bounds["max_task_retries"])(BatchDecoder)
    decoders = [decoder.remote(spec, options) for _ in range(workers)]
    try:
        yield from _in_order(decoders, chunks)
    finally:  # also when the job stops early: no decoder outlives its pipeline
        for actor in decoders:
            ray.kill(actor)


def _in_order(decoders: list[Any], chunks: Iterable[Any]) -> Iterator[pa.Table]:
    """Each chunk decoded by the decoder with the fewest queued, IN_FLIGHT x decoders chunks
    queued in all; the results in the order the chunks came."""
    import ray

    pending: deque[tuple[Any, int]] = deque()  # (result ref, decoder index), in chunk order
    queued = [0] * len(decoders)
    source = iter(chunks)

    def send() -> None:
        chunk = next(source, None)
        if chunk is not None:
            i = queued.index(min(queued))
            pending.append((decoders[i].decode.remote(chunk), i))
            queued[i] += 1

    for _ in range(IN_FLIGHT * len(decoders)):
        send()
    while pending:
        ref, i = pending.popleft()
        table = ray.get(ref)
        queued[i] -= 1
        send()
        yield table


def _npz_chunks(members: pa.Table, workers: int) -> Iterator[Any]:
    """Item chunks (object refs) of every array member, in order: one reading task per member,
    which never runs more than the decoders' queues ahead."""
    import ray

    reader: Any = ray.remote(read_npz_member).options(
        num_cpus=0,  # streaming inflate: light next to decoding, must not take a decoder CPU
        max_retries=NPZ_READ_RETRIES,
        _generator_backpressure_num_objects=IN_FLIGHT * workers + 1)
    for i in range(members.num_rows):
        yield from reader.remote(members.slice(i, 1))
