"""The stage job's source, listed: picks the format and hands the source to its lister.

Folders and single files are listed by ``listing``, CSV/TSV manifests by ``csv_source`` and
.npz arrays by ``npz_source``; every one ends as a ``Listing`` for the decode pipeline.
"""

from __future__ import annotations

from medray.cluster.stage import csv_source, npz_source
from medray.cluster.stage.listing import Listing, detect_format, folder_items, items_table
from medray.workers.specs import StageSpec


def list_source(spec: StageSpec) -> Listing:
    """List ``spec.source`` in ``spec.format`` (``auto``: by its name, then by its files)."""
    names = spec.label_names or None
    fmt: str = spec.format
    if fmt == "auto":
        detected = detect_format(spec.source)
        fmt = "auto" if detected == "folder" else detected  # folders: DICOM by their files
    if fmt == "npz":
        return npz_source.npz_listing(spec.source, names, spec.max_pixels)
    if fmt == "csv":
        items = csv_source.csv_items(spec)
        has_splits, skipped = spec.split_column is not None, []
    else:
        tree = folder_items(spec.source, fmt, names)
        fmt, items, has_splits, skipped = tree.format, tree.items, tree.has_splits, tree.skipped
    good = [it for it in items if not it.get("error_type")]
    found = sorted({lab for it in good for lab in (it.get("labels") or [])})
    # a manifest is multi-label unless every row names exactly one label (a plain class column)
    multi = fmt == "csv" and any(it["labels"] is not None and len(it["labels"]) != 1
                                 for it in good)
    return Listing(fmt, items_table(items), len(items), list(names) if names else found, multi,
                   has_splits, len(skipped), skipped[:5])
