"""What Ray runs for the stage job in other processes: the batch decoder actors, the crash guard
that keeps a poison input from killing them forever, and the tasks that stream .npz arrays.

``BatchDecoder`` runs in a Ray Data actor pool: it reads the files of a batch concurrently (I/O
overlaps), decodes them one by one and returns shard rows or error rows (``OUT_SCHEMA``).
``read_npz_member`` tasks stream one .npz array each into item rows with the array row inline.
Both are plain code: Ray Data applies the remote wrapping where the pipeline is built.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from medray.cluster.infra import faults, logs
from medray.cluster.infra.home import deid_salt
from medray.cluster.stage.listing import ITEM_SCHEMA
from medray.cluster.stage.npz_source import iter_npz_rows, local_npz
from medray.cluster.store.lake import source_filesystem
from medray.workers.deid import Deidentifier, deidentify_bytes
from medray.workers.errors import ConfigError, ImageError, InputError
from medray.workers.imaging import array_to_pixels, decode_image
from medray.workers.shards import SHARD_SCHEMA, image_id, metadata_json, split_for
from medray.workers.specs import StageSpec

log = logging.getLogger(__name__)

READ_THREADS = 8
_BASE_FILE_BYTES = 16 * 1024 * 1024
_BYTES_PER_PIXEL_BOUND = 6  # 3 samples x 16 bits: the largest common uncompressed pixel

OUT_SCHEMA = (SHARD_SCHEMA
              .append(pa.field("_error_type", pa.string()))
              .append(pa.field("_error_message", pa.string()))
              .append(pa.field("_stage", pa.string()))
              .append(pa.field("_bytes", pa.int64()))
              .append(pa.field("_known", pa.bool_())))


def max_file_bytes(max_pixels: int) -> int:
    """Largest input file read into memory: an uncompressed image at the pixel limit."""
    return _BASE_FILE_BYTES + _BYTES_PER_PIXEL_BOUND * int(max_pixels)


def salt_fingerprint(salt: bytes | None = None) -> str:
    """A public tag of the de-identification salt: equal tags, comparable patient keys."""
    return Deidentifier(salt if salt is not None else deid_salt()).patient_key(
        "medray-salt-fingerprint")[:16]


def raw_split(item_split: str | None, raw_key: str, val_percent: float,
              test_percent: float) -> str:
    """The source's split when it has one, else a deterministic split of the raw patient key,
    so all images of a patient (or of a retrain.py _nohash_ group) land in one split."""
    return item_split or split_for(raw_key, val_percent, test_percent)


@dataclass(frozen=True)
class DecodeOptions:
    """What a decoder needs besides the spec: what the driver learned while listing the source
    and preparing the version."""

    label_names: tuple[str, ...] = ()
    multi_label: bool = False
    salt_id: str | None = None    # the driver's salt fingerprint: a decoder with another refuses
    known: Any = None             # sorted "S32" digests of the previous version, or an ObjectRef
    crash_dir: str | None = None  # where the crash guard keeps its notes (None: no guard)


class BatchDecoder:
    """Reads and decodes a batch of items into shard rows or error rows (runs in Ray actors).

    Images whose digest is in ``options.known`` (already in the previous version) are read and
    hashed but not decoded again.
    """

    def __init__(self, spec: StageSpec, options: DecodeOptions) -> None:
        logs.configure()
        self.spec = spec
        self.max_bytes = max_file_bytes(spec.max_pixels)
        self.label_names = list(options.label_names)
        self.multi_label = options.multi_label
        salt = deid_salt()
        if options.salt_id and salt_fingerprint(salt) != options.salt_id:
            raise ConfigError("this node's de-identification salt differs from the driver's: "
                              "set the same MEDRAY_DEID_SALT on every node of the cluster")
        self.deid = Deidentifier(salt)
        known = options.known
        if known is not None and not isinstance(known, np.ndarray):
            import ray

            known = ray.get(known)
        self.known: np.ndarray | None = known if known is not None and len(known) else None
        self.pool = ThreadPoolExecutor(READ_THREADS)
        self.crash = CrashGuard(options.crash_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.to_pylist()
        # remote files: read ahead a few while decoding, so I/O overlaps decoding and memory
        # holds at most READ_THREADS files; local reads are faster inline than thread hand-offs
        reads = iter([it for it in items if it["kind"] == "file" and not it.get("error_type")
                      and "://" in it["uri"]])
        futures: dict[int, Future[bytes | tuple[str, str]]] = {}

        def top_up() -> None:
            while len(futures) < READ_THREADS:
                nxt = next(reads, None)
                if nxt is None:
                    return
                futures[id(nxt)] = self.pool.submit(self._read, nxt)

        rows = []
        for it in items:
            top_up()
            future = futures.pop(id(it), None)
            if future is not None:
                data: bytes | tuple[str, str] | None = future.result()
            elif it["kind"] == "file" and not it.get("error_type"):
                data = self._read(it)
            else:
                data = None
            rows.append(self._one(it, data))
        self.crash.clear()
        cols = {f.name: [r.get(f.name) for r in rows] for f in OUT_SCHEMA}
        return pa.Table.from_pydict(cols, schema=OUT_SCHEMA)

    # -- reading ------------------------------------------------------------------------------
    def _read(self, item: dict[str, Any]) -> bytes | tuple[str, str]:
        refused = self._too_large(item["size"]) if item.get("size") is not None else None
        if refused:
            return refused
        try:
            if "://" not in item["uri"]:  # a local path from the listing: plain open is fastest
                # O_NONBLOCK: a file swapped for a FIFO since listing must not block the read
                fd = os.open(item["uri"], os.O_RDONLY | os.O_NONBLOCK)
                with open(fd, "rb") as local:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode):
                        return ("unreadable", "not a regular file")
                    return self._too_large(st.st_size) or local.read()
            fs, path = source_filesystem(item["uri"])
            with fs.open_input_file(path) as fh:
                return self._too_large(fh.size()) or fh.read()
        except (OSError, InputError) as exc:
            return ("unreadable", f"{type(exc).__name__}: {exc}")

    def _too_large(self, size: int) -> tuple[str, str] | None:
        if size <= self.max_bytes:
            return None
        return ("too_large", f"the file has {size} bytes, more than the {self.max_bytes} "
                f"allowed by max_pixels={self.spec.max_pixels}")

    # -- one item -----------------------------------------------------------------------------
    def _one(self, item: dict[str, Any], data: bytes | tuple[str, str] | None) -> dict[str, Any]:
        if item.get("error_type"):
            return self._error(item, item["error_type"], item.get("error_message") or "", 0,
                               stage="list")
        if self.crash.poisoned(item["uri"]):
            return self._error(item, "crashed", "decoding this input crashed the worker "
                               "process; it was skipped", item.get("size") or 0)
        try:
            if item["kind"] == "array":
                return self._array_row(item)
            if isinstance(data, tuple):
                return self._error(item, data[0], data[1], 0, stage="read")
            assert data is not None
            return self._file_row(item, data)
        except ConfigError:
            raise
        except ImageError as exc:
            return self._error(item, exc.kind, exc.message, item.get("size") or 0)
        except Exception as exc:  # noqa: BLE001 - one bad input must never stop the job
            log.warning("unexpected %s on %s", type(exc).__name__, item["uri"])
            return self._error(item, "invalid", f"{type(exc).__name__}: {exc}"[:300],
                               item.get("size") or 0)

    def _is_known(self, digest: str) -> bool:
        if self.known is None:
            return False
        # numpy "S32" drops trailing NUL bytes on both sides alike, so compare as S32 too
        probe = np.array([bytes.fromhex(digest)], dtype="S32")
        i = int(np.searchsorted(self.known, probe)[0])
        return i < len(self.known) and bool(self.known[i] == probe[0])

    def _file_row(self, item: dict[str, Any], data: bytes) -> dict[str, Any]:
        digest = image_id(data)
        if self._is_known(digest):
            return self._known_row(item, digest, len(data))
        spec = self.spec
        self.crash.enter(item["uri"])
        try:
            img = decode_image(data, size=spec.image_size, channels=spec.channels,
                               name=item["uri"], max_pixels=spec.max_pixels)
        except ImageError as exc:
            return self._error(item, exc.kind, exc.message, len(data), digest)
        raw_key = item.get("patient_key") or f"id:{digest}"
        if img.patient_ref and not raw_key.startswith("csv:"):
            raw_key = f"dicom:{img.patient_ref}"  # the raw ID is hashed below, never stored
        original = None
        if spec.keep_original:
            # DICOM originals are stored de-identified (PS3.15 basic profile), never raw
            original = (deidentify_bytes(data, self.deid, max_pixels=spec.max_pixels)[0]
                        if img.format == "dicom" else data)
        row = self._row(item, digest, img.pixels, raw_key, len(data))
        return {**row, "orig_height": img.original_height, "orig_width": img.original_width,
                "format": img.format, "metadata": metadata_json(img.metadata),
                "patient_key": self.deid.patient_key(raw_key), "original": original}

    def _array_row(self, item: dict[str, Any]) -> dict[str, Any]:
        shape = tuple(item["shape"])
        arr = np.frombuffer(item["data"], dtype=np.dtype(item["dtype"])).reshape(shape)
        digest = image_id(item["data"] + str(shape).encode())
        if self._is_known(digest):
            return self._known_row(item, digest, len(item["data"]))
        labels = None
        if item.get("label_values") is not None:
            try:
                labels = self._array_labels(item["label_values"])
            except (ValueError, IndexError) as exc:
                return self._error(item, "bad_label", str(exc), len(item["data"]), digest)
        pixels = array_to_pixels(arr, size=self.spec.image_size, channels=self.spec.channels)
        row = self._row({**item, "labels": labels}, digest, pixels, f"id:{digest}",
                        len(item["data"]))
        # an array row has no patient: its split is by its own digest, its key stays empty
        return {**row, "orig_height": int(shape[0]),
                "orig_width": int(shape[1]) if len(shape) > 1 else 1, "format": "array",
                "original": item["data"] if self.spec.keep_original else None}

    def _array_labels(self, values: list[float]) -> list[str]:
        vec = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(vec)):
            raise ValueError("the label is NaN or infinite")
        if self.multi_label:
            if len(vec) != len(self.label_names):
                raise ValueError(f"{len(vec)} label values for {len(self.label_names)} labels")
            return [self.label_names[j] for j in np.flatnonzero(vec > 0)]
        index = int(vec[0])
        if index != vec[0] or not 0 <= index < len(self.label_names):
            raise ValueError(f"label {vec[0]} is not a class index 0..{len(self.label_names) - 1}")
        return [self.label_names[index]]

    # -- rows ---------------------------------------------------------------------------------
    def _row(self, item: dict[str, Any], digest: str, pixels: np.ndarray, raw_key: str,
             nbytes: int) -> dict[str, Any]:
        """The columns every decoded row has; the caller adds what its kind of input knows."""
        spec = self.spec
        return {
            "image_id": digest, "source_uri": item["uri"], "labels": item.get("labels"),
            "split": raw_split(item.get("split"), raw_key, spec.val_percent, spec.test_percent),
            "height": spec.image_size, "width": spec.image_size, "channels": spec.channels,
            "pixels": pixels.tobytes(), "_bytes": nbytes, "_known": False,
        }

    def _known_row(self, item: dict[str, Any], digest: str, nbytes: int) -> dict[str, Any]:
        return {"image_id": digest, "source_uri": item["uri"], "labels": item.get("labels"),
                "split": "", "height": 0, "width": 0, "channels": 0, "pixels": b"",
                "_bytes": nbytes, "_known": True}

    def _error(self, item: dict[str, Any], kind: str, message: str, nbytes: int,
               digest: str | None = None, stage: str = "decode") -> dict[str, Any]:
        return {"source_uri": item["uri"], "image_id": digest or "", "split": "", "height": 0,
                "width": 0, "channels": 0, "pixels": b"", "_error_type": kind,
                "_error_message": message, "_stage": stage, "_bytes": nbytes, "_known": False}


class CrashGuard:
    """Turns an input that kills the decoding process (a decoder segfault, an OOM kill) into an
    error row instead of an endless retry loop.

    Before each decode the actor notes the input in a small per-actor file; Ray restarts a dead
    actor under the same id and retries its batch, and the new incarnation finds the note and
    skips that input. ``MEDRAY_FAULT=stage_crash_on:TEXT`` kills the process on inputs whose
    URI contains TEXT (once), to test this.
    """

    def __init__(self, folder: str | None) -> None:
        self.fd: int | None = None
        self.bad: set[str] = set()
        self.fault = faults.stage_crash_text()
        if not folder:
            return
        try:
            import ray

            actor = ray.get_runtime_context().get_actor_id()
        except Exception:  # noqa: BLE001 - outside Ray (unit tests): no guard needed
            actor = None
        if not actor:
            return
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, f"{actor}.current")
        bad_list = os.path.join(folder, f"{actor}.bad")  # every poison seen, across restarts
        if os.path.exists(path):
            with open(path, "rb") as fh:
                note = fh.read()
            size = int.from_bytes(note[:4], "little") if len(note) >= 4 else 0
            last = note[4:4 + size].decode(errors="replace")
            if last:
                # the input is not named: source paths may carry identities (docs/staging.md)
                log.warning("a previous worker died while decoding an input; skipping it")
                with open(bad_list, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(last) + "\n")  # JSON: a name may hold a newline
        if os.path.exists(bad_list):
            with open(bad_list, encoding="utf-8") as fh:
                self.bad = {json.loads(line) for line in fh if line.strip()}
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)

    def poisoned(self, uri: str) -> bool:
        return uri in self.bad

    def enter(self, uri: str) -> None:
        if self.fd is not None:  # one syscall per image: a length-prefixed note at offset 0
            data = uri.encode()
            os.pwrite(self.fd, len(data).to_bytes(4, "little") + data, 0)
        if self.fault and self.fault in uri and self.fd is not None:
            faults.die()  # fault injection: see the class docstring

    def clear(self) -> None:
        if self.fd is not None:
            os.pwrite(self.fd, b"\0\0\0\0", 0)


# ---------------------------------------------------------------------------- .npz members
def read_npz_member(batch: pa.Table) -> Iterator[pa.Table]:
    """Ray Data UDF: one member descriptor in, item tables of NPZ_CHUNK array rows out."""
    logs.configure()
    for member in batch.to_pylist():
        with local_npz(member["uri"]) as local:
            yield from _npz_member_tables(member, local)


def _npz_member_tables(member: dict[str, Any], local: str) -> Iterator[pa.Table]:
    labels: Iterator[tuple[int, np.ndarray]] | None = None
    if member["labels_array"]:
        labels = iter_npz_rows(local, member["labels_array"])
    for start, rows in iter_npz_rows(local, member["array"]):
        label_rows = next(labels)[1] if labels is not None else None  # same chunking
        n = len(rows)
        cols: dict[str, list[Any]] = {
            "kind": ["array"] * n,
            "uri": [f"{member['uri']}#{member['array']}/{start + i}" for i in range(n)],
            "size": [rows[0].nbytes] * n,
            "split": [member["split"]] * n,
            "data": [np.ascontiguousarray(r).tobytes() for r in rows],
            "shape": [list(rows.shape[1:])] * n,
            "dtype": [rows.dtype.str] * n,
            "label_values": ([None] * n if label_rows is None else
                             [np.atleast_1d(v).astype(np.float64).tolist() for v in label_rows]),
        }
        for name in ITEM_SCHEMA.names:
            cols.setdefault(name, [None] * n)
        yield pa.Table.from_pydict(cols, schema=ITEM_SCHEMA)
