"""What Ray runs for the stage job in other processes: the batch decoder actors.

``BatchDecoder`` runs as one Ray actor per CPU (``pipeline``): it reads the files of a batch
concurrently (I/O overlaps; a ``dicomweb://`` item is a PACS instance retrieved by WADO-RS into
memory, ``dicomweb_source.retrieve``), decodes them one by one and returns shard rows or error
rows (``OUT_SCHEMA``); a crash guard (``crash``) keeps a poison input from killing it forever.
The .npz reading tasks live with their source (``npz_source.read_npz_member``). Plain code:
``pipeline`` applies the remote wrapping where it starts the actors.

DICOM inputs leave here de-identified (docs/deid.md): their path becomes a keyed pseudonym in
every row (the raw path travels back to the driver in ``_raw_uri`` for the private linkage,
never to the lake), a DICOM that may carry burned-in text is an errors row unless
``--allow-burned-in``, and a kept original is the de-identified file. Kept JPEG and PNG
originals lose their metadata (``workers.originals``).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import stat
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from medray.cluster.infra import logs
from medray.cluster.infra.home import deid_salt
from medray.cluster.stage import dicomweb_source
from medray.cluster.stage.crash import CrashGuard
from medray.cluster.stage.listing import DICOM_EXT
from medray.cluster.store.lake import source_filesystem
from medray.workers import attributes, dicomweb
from medray.workers.deid import Deidentifier, Options
from medray.workers.dicom_io import deidentify_bytes, quiet_pydicom
from medray.workers.errors import ConfigError, ImageError, InfraError, InputError
from medray.workers.imaging import array_to_pixels, decode_image, sniff_format
from medray.workers.originals import strip_metadata
from medray.workers.pixels import max_input_bytes
from medray.workers.shards import SHARD_SCHEMA, image_id, metadata_json, split_for
from medray.workers.specs import StageSpec

log = logging.getLogger(__name__)

READ_THREADS = 8
_QUOTED_PATH = re.compile(r"""(['"])[^'"]*/[^'"]*\1""")  # a quoted path in an OS error

OUT_SCHEMA = (SHARD_SCHEMA
              .append(pa.field("_error_type", pa.string()))
              .append(pa.field("_error_message", pa.string()))
              .append(pa.field("_stage", pa.string()))
              .append(pa.field("_bytes", pa.int64()))
              .append(pa.field("_known", pa.bool_()))
              .append(pa.field("_keep_key", pa.bool_()))  # known: the previous key stands
              .append(pa.field("_raw_uri", pa.string()))  # a pseudonymised row's path
              .append(pa.field("_bad_attributes", pa.list_(pa.string()))))  # read as null


def max_file_bytes(max_pixels: int) -> int:
    """Largest input file read into memory: an uncompressed image at the pixel limit."""
    return max_input_bytes(max_pixels)


def source_label(source: str, fmt: str, salt: bytes | None = None) -> str:
    """How the lake names a staging source: as given, but a DICOM source by its keyed
    pseudonym (a DICOM folder is often named after its patient)."""
    if fmt != "dicom":
        return source
    return Deidentifier(salt if salt is not None else deid_salt()).pseudonym(source)


def deid_options(spec: StageSpec) -> Options:
    """The de-identification options a stage spec asks for."""
    return Options.from_flags(spec.retain, spec.clean)


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
    fmt: str = ""                 # the listing's format: "dicom" pseudonymises every path
    attributes: tuple[tuple[str, str], ...] = ()  # (column, kind): typed attribute columns


class BatchDecoder:
    """Reads and decodes a batch of items into shard rows or error rows (runs in Ray actors).

    Images whose digest is in ``options.known`` (already in the previous version) are read and
    hashed but not decoded again.
    """

    def __init__(self, spec: StageSpec, options: DecodeOptions) -> None:
        logs.configure()
        quiet_pydicom()  # its warnings quote DICOM values: never into the job's log
        self.spec = spec
        self.max_bytes = max_file_bytes(spec.max_pixels)
        self.label_names = list(options.label_names)
        self.multi_label = options.multi_label
        salt = deid_salt()
        if options.salt_id and salt_fingerprint(salt) != options.salt_id:
            raise ConfigError("this node's de-identification salt differs from the driver's: "
                              "mount the same salt file (MEDRAY_DEID_SALT_FILE) on every node "
                              "of the cluster (docs/deid.md)")
        self.deid = Deidentifier(salt, deid_options(spec))
        self.all_dicom = options.fmt == "dicom"
        known = options.known
        if known is not None and not isinstance(known, np.ndarray):
            import ray

            known = ray.get(known)
        self.known: np.ndarray | None = known if known is not None and len(known) else None
        self.pool = ThreadPoolExecutor(READ_THREADS)
        self.crash = CrashGuard(options.crash_dir)
        self.attributes = list(options.attributes)
        self.out_schema = OUT_SCHEMA
        for f in attributes.fields(self.attributes):
            self.out_schema = self.out_schema.append(f)

    def decode(self, items: pa.Table) -> pa.Table:
        """A chunk of items (``listing.ITEM_SCHEMA``), decoded ``spec.decode_batch`` at a time:
        its rows (``out_schema``), in order."""
        step = self.spec.decode_batch
        return pa.concat_tables([self(items.slice(start, step))
                                 for start in range(0, max(1, items.num_rows), step)])

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
        cols = {f.name: [r.get(f.name) for r in rows] for f in self.out_schema}
        return pa.Table.from_pydict(cols, schema=self.out_schema)

    # -- reading ------------------------------------------------------------------------------
    def _read(self, item: dict[str, Any]) -> bytes | tuple[str, str]:
        refused = self._too_large(item["size"]) if item.get("size") is not None else None
        if refused:
            return refused
        if dicomweb.is_dicomweb(item["uri"]):  # a PACS instance by WADO-RS, in memory only
            try:
                data = dicomweb_source.retrieve(item["uri"], self.spec.auth_file, self.max_bytes)
            except InfraError as exc:  # retried with backoff already: the network, not the file
                return ("unreachable", exc.message)
            except InputError as exc:
                return ("unreadable", exc.message)
            return self._too_large(len(data)) or data
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
        row = self._row_of(item, data)
        if self._is_dicom(item, data, row):  # its path may name the patient: a pseudonym
            shown = self.deid.pseudonym(item["uri"])
            row["_raw_uri"], row["source_uri"] = item["uri"], shown
            if row.get("_error_message"):
                message = row["_error_message"].replace(item["uri"], shown)
                row["_error_message"] = _QUOTED_PATH.sub("'<path>'", message)
        return row

    def _is_dicom(self, item: dict[str, Any], data: bytes | tuple[str, str] | None,
                  row: dict[str, Any]) -> bool:
        if self.all_dicom or row.get("format") == "dicom":
            return True
        if item["kind"] != "file":
            return False
        name = item["uri"].split("?", 1)[0].rsplit("/", 1)[-1].lower()
        if posixpath.splitext(name)[1] in DICOM_EXT:
            return True
        return isinstance(data, bytes) and sniff_format(data) == "dicom"

    def _row_of(self, item: dict[str, Any], data: bytes | tuple[str, str] | None
                ) -> dict[str, Any]:
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
        except Exception as exc:  # noqa: BLE001 - one input must never stop the job, but a
            # bug in medray is not an input's fault: its own kind, logged with where it happened
            # (frames only: the input and the message may name a path, which may name a patient)
            log.error("internal error while staging an input: %s at\n%s", type(exc).__name__,
                      "".join(traceback.format_tb(exc.__traceback__)))
            return self._error(item, "internal_error", f"{type(exc).__name__}: {exc}"[:300],
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
        raw_key = item.get("patient_key") or f"id:{digest}"
        if self._is_known(digest):
            # a DICOM's patient comes from its header, which the same bytes repeat: keep it
            dicom = sniff_format(data) == "dicom"
            return {**self._known_row(item, digest, len(data), item.get("labels"),
                                      None if dicom else raw_key), **self._attributes(item)}
        spec = self.spec
        self.crash.enter(item["uri"])
        try:
            img = decode_image(data, size=spec.image_size, channels=spec.channels,
                               name=item["uri"], max_pixels=spec.max_pixels)
        except ImageError as exc:
            return self._error(item, exc.kind, exc.message, len(data), digest)
        if img.burned_in and not spec.allow_burned_in:
            return self._error(item, "burned_in_annotation",
                               f"the pixels may carry burned-in text: {img.burned_in}; pass "
                               "--allow-burned-in to stage such images (docs/deid.md)",
                               len(data), digest)
        if img.patient_ref and not raw_key.startswith("csv:"):
            raw_key = f"dicom:{img.patient_ref}"  # the raw ID is hashed below, never stored
        original = None
        if spec.keep_original:
            # DICOM originals are stored de-identified, JPEG/PNG without metadata, never raw
            original = (deidentify_bytes(data, self.deid, max_pixels=spec.max_pixels)[0]
                        if img.format == "dicom" else strip_metadata(data, img.format))
        metadata = dict(img.metadata)
        if img.instance_ref:
            metadata["sop_instance_uid"] = self.deid.remap_uid(img.instance_ref)
        row = {**self._row(item, digest, img.pixels, raw_key, len(data)),
               **self._attributes(item, img)}
        return {**row, "orig_height": img.original_height, "orig_width": img.original_width,
                "format": img.format, "metadata": metadata_json(metadata),
                "patient_key": self.deid.patient_key(raw_key), "original": original}

    def _array_row(self, item: dict[str, Any]) -> dict[str, Any]:
        shape = tuple(item["shape"])
        digest = image_id(item["data"] + str(shape).encode())
        labels = None
        if item.get("label_values") is not None:
            try:
                labels = self._array_labels(item["label_values"])
            except (ValueError, IndexError) as exc:
                return self._error(item, "bad_label", str(exc), len(item["data"]), digest)
        if self._is_known(digest):  # known or not, its labels come from the label array
            return self._known_row(item, digest, len(item["data"]), labels, f"id:{digest}",
                                   hashed=False)
        self.crash.enter(item["uri"])
        arr = np.frombuffer(item["data"], dtype=np.dtype(item["dtype"])).reshape(shape)
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
    def _attributes(self, item: dict[str, Any], img: Any = None) -> dict[str, Any]:
        """The typed attribute columns of a file's row: a manifest's values (typed while
        listing), or a decoded DICOM's view (and age and sex, when retained); a value that
        cannot be read is null and named in ``_bad_attributes``."""
        if not self.attributes:
            return {}
        if item.get("attributes"):
            values = json.loads(item["attributes"])
            return {name: values.get(name) for name, _ in self.attributes}
        if img is None or img.format != "dicom":
            return {}
        raw = {attributes.DICOM_VIEW: img.metadata.get("view_position"),
               attributes.DICOM_AGE: img.characteristics.get("PatientAge"),
               attributes.DICOM_SEX: img.characteristics.get("PatientSex")}
        typed, bad = attributes.typed(self.attributes, raw)
        return {**typed, "_bad_attributes": bad or None}

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

    def _known_row(self, item: dict[str, Any], digest: str, nbytes: int,
                   labels: list[str] | None, raw_key: str | None,
                   hashed: bool = True) -> dict[str, Any]:
        """An image the previous version holds: not decoded again, but its labels, split and
        patient key are worked out as for a new one, so a change in the source follows.

        ``raw_key`` None: the key is in the image's own bytes (DICOM), so it is unchanged;
        ``split`` "" then means the previous one. ``hashed`` False: the row keeps no key."""
        spec = self.spec
        split = item.get("split") or ""
        key: str | None = None
        if raw_key is not None:
            split = raw_split(split or None, raw_key, spec.val_percent, spec.test_percent)
            key = self.deid.patient_key(raw_key) if hashed else None
        return {"image_id": digest, "source_uri": item["uri"], "labels": labels,
                "split": split, "patient_key": key, "height": 0, "width": 0, "channels": 0,
                "pixels": b"", "_bytes": nbytes, "_known": True,
                "_keep_key": raw_key is None}

    def _error(self, item: dict[str, Any], kind: str, message: str, nbytes: int,
               digest: str | None = None, stage: str = "decode") -> dict[str, Any]:
        return {"source_uri": item["uri"], "image_id": digest or "", "split": "", "height": 0,
                "width": 0, "channels": 0, "pixels": b"", "_error_type": kind,
                "_error_message": message, "_stage": stage, "_bytes": nbytes, "_known": False}
