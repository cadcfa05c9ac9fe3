"""CSV/TSV manifests as a staging source, such as ChestX-ray14's Data_Entry_2017.csv.

Each row names an image by a path relative to the images root (``--images-root``, default the
manifest's folder), its labels and, with ``--split-column``, its split (empty: by patient). A
path that is absolute, a URI or climbs out of the root is an error row and is never read; a bare
file name is also looked up anywhere below the root (ChestX-ray14 ships ``images_001/images/...``
folders).

Patient attribute columns (``--attributes``: by default the usual ones present, such as
``Patient Age``, ``Patient Gender`` and ``View Position``) travel with each item as typed values
(``workers.attributes``); identifying columns are refused, unreadable values become null and
are counted.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import logging
import posixpath
import re
from typing import Any

import pyarrow.fs as pafs

from medray.cluster.stage.listing import SPLIT_DIRS, list_tree
from medray.cluster.store.lake import source_filesystem, source_uri
from medray.workers import attributes
from medray.workers.errors import ConfigError, NotFoundError
from medray.workers.shards import SHARD_SCHEMA, nohash_key
from medray.workers.specs import StageSpec

log = logging.getLogger(__name__)
HEADER_BYTES = 1 << 20  # far more than any real header line; the precheck reads no further
_DRIVE = re.compile(r"^[A-Za-z]:/")


def parse_labels(raw: str | None, sep: str, no_finding: str | None) -> list[str] | None:
    """'Effusion|Mass' -> ['Effusion', 'Mass']; 'No Finding' -> []; empty -> None (unknown)."""
    text = (raw or "").strip()
    if not text:
        return None
    parts = {p.strip() for p in (text.split(sep) if sep else [text])} - {""}
    if no_finding:
        parts.discard(no_finding)
    return sorted(parts)


def resolve_under(root: str, rel: str) -> str | None:
    """``root/rel`` normalised, or None when ``rel`` is absolute, a URI, or climbs out."""
    rel = rel.strip().replace("\\", "/")
    if not rel or rel.startswith("/") or _DRIVE.match(rel) or "://" in rel:
        return None
    base = root.rstrip("/")
    resolved = posixpath.normpath(posixpath.join(base, rel))
    return resolved if resolved.startswith(base + "/") else None


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _delimiter(path: str) -> str:
    return "\t" if path.lower().endswith(".tsv") else ","


def check_columns(spec: StageSpec, columns: list[str]) -> str | None:
    """The patient column to group splits by (None: group by file name); ConfigError naming
    the flag to pass when a column the spec needs is missing."""
    for flag, needed in (("--path-column", spec.path_column),
                         ("--label-column", spec.label_column),
                         ("--split-column", spec.split_column)):
        if needed is not None and needed not in columns:
            raise ConfigError(f"{spec.source} has no column {needed!r}"
                              f"{_suggest(needed, columns)}: pass {flag} (columns: {columns})")
    attribute_columns(spec, columns)  # a missing or identifying attribute column: refused
    patient = spec.patient_column
    if patient and patient not in columns:
        if patient != StageSpec.model_fields["patient_column"].default:
            raise ConfigError(f"{spec.source} has no patient column {patient!r}"
                              f"{_suggest(patient, columns)} (columns: {columns})")
        return None  # the default column may be absent: file names group the splits
    return patient


def attribute_columns(spec: StageSpec, columns: list[str]) -> list[tuple[str, str]]:
    """(column, kind) of the attribute columns the spec keeps from a manifest with
    ``columns``; ConfigError for one that is missing, reserved or identifying."""
    reserved = (spec.path_column, spec.label_column, spec.patient_column, spec.split_column)
    kept = attributes.choose(spec.attributes, columns, reserved)
    for name in kept:
        if name in SHARD_SCHEMA.names or name.startswith("_"):
            raise ConfigError(f"--attributes: a column named {name!r} would clash with the "
                              "shards' own columns: rename it in the manifest")
    return [(c, attributes.kind_of(c)) for c in kept]


def _read(source: str, limit: int | None = None) -> tuple[pafs.FileSystem, str, str]:
    """(fs, path, text) of a manifest, or of its first ``limit`` bytes."""
    fs, path = source_filesystem(source)
    try:
        with fs.open_input_stream(path) as fh:
            data = fh.read(limit)
        # a limited read may cut a character at its end: final=False leaves it out
        text = codecs.getincrementaldecoder("utf-8-sig")().decode(data, final=limit is None)
    except FileNotFoundError:
        raise NotFoundError(f"manifest not found: {source}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not UTF-8 text: {exc}") from None
    return fs, path, text


def header(source: str) -> list[str]:
    """The column names of a manifest, from its first line only (the precheck's read)."""
    _, path, text = _read(source, HEADER_BYTES)
    return next(csv.reader(io.StringIO(text), delimiter=_delimiter(path)), [])


def csv_items(spec: StageSpec) -> list[dict[str, Any]]:
    """Items of the spec's CSV/TSV manifest; rows whose path is unsafe or missing become
    error items."""
    source = spec.source
    fs, path, text = _read(source)
    reader = csv.DictReader(io.StringIO(text), delimiter=_delimiter(path))
    patient_column = check_columns(spec, list(reader.fieldnames or []))
    kept = attribute_columns(spec, list(reader.fieldnames or []))
    if spec.patient_column and patient_column is None:
        log.warning("%s has no %r column: splits group images by file name instead", source,
                    spec.patient_column)
    if spec.images_root:
        root_fs, root, entries = list_tree(spec.images_root)
    else:
        root_fs, root = fs, posixpath.dirname(path)
        _, _, entries = list_tree(source_uri(fs, root))
    sizes = {e.rel: e.size for e in entries if not e.error}
    by_name: dict[str, list[str]] | None = None
    known = set(spec.label_names or [])
    base = root.rstrip("/")
    items = []
    for line, row in enumerate(reader, start=2):
        rel = (row.get(spec.path_column) or "").strip()
        labels = parse_labels(row.get(spec.label_column), spec.label_sep, spec.no_finding)
        patient = (row.get(patient_column) or "").strip() if patient_column else ""
        split_value = (row.get(spec.split_column) or "").strip() if spec.split_column else ""
        item: dict[str, Any] = {
            "kind": "file", "labels": labels, "split": SPLIT_DIRS.get(split_value.lower()),
            "patient_key": f"csv:{patient}" if patient else f"name:{nohash_key(rel)}",
        }
        if kept:
            values, bad = attributes.typed(kept, row)
            item["attributes"], item["attribute_bad"] = json.dumps(values), bad
        resolved = resolve_under(root, rel)
        if resolved is None:
            item["uri"] = f"{source}#line{line}"
            item["error_type"] = "unsafe_path"
            item["error_message"] = (f"line {line}: path {rel!r} is empty, absolute or leaves "
                                     "the images root: give paths relative to --images-root")
        else:
            wanted = resolved[len(base) + 1:]
            found: str | None = wanted if wanted in sizes else None
            if found is None and "/" not in wanted:
                if by_name is None:  # ChestX-ray14 ships images_001/images/... folders
                    by_name = {}
                    for key in sizes:
                        by_name.setdefault(posixpath.basename(key), []).append(key)
                matches = by_name.get(wanted, [])
                found = matches[0] if len(matches) == 1 else None
                if len(matches) > 1:
                    item["error_type"] = "ambiguous_path"
                    item["error_message"] = (f"line {line}: {rel!r} matches {len(matches)} "
                                             "files below the images root: give its path")
            item["uri"] = source_uri(root_fs, f"{base}/{found or wanted}")
            item["size"] = sizes.get(found) if found else None
            if found is None and "error_type" not in item:
                item["error_type"] = "missing"
                item["error_message"] = f"line {line}: {rel!r} is not under the images root"
        if "error_type" in item:
            pass  # the first reason stands
        elif split_value and item["split"] is None:
            item["error_type"] = "bad_split"
            item["error_message"] = (f"line {line}: split {split_value!r} is not one of "
                                     f"{sorted(set(SPLIT_DIRS.values()))} (or empty)")
        elif known and labels and set(labels) - known:
            item["error_type"] = "unknown_label"
            item["error_message"] = (f"line {line}: labels {sorted(set(labels) - known)} are "
                                     "not in --label-names")
        items.append(item)
    if not items:
        raise ConfigError(f"{source} lists no images")
    return items
