"""The stage job's source, listed: picks the format and hands the source to its lister.

Folders and single files are listed by ``listing``, CSV/TSV manifests by ``csv_source``,
.npz arrays by ``npz_source`` and a PACS (``dicomweb://``) by ``dicomweb_source``; every one
ends as a ``Listing`` for the decode pipeline, with the typed patient attribute columns its
shards will have (a manifest's ``--attributes``; DICOM's view, and age and sex when
de-identification keeps them).
"""

from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc

from medray.cluster.stage import csv_source, dicomweb_source, npz_source
from medray.cluster.stage.listing import Listing, detect_format, folder_items, items_table
from medray.workers import attributes, dicomweb
from medray.workers.specs import StageSpec


def list_source(spec: StageSpec, skip: set[str] | None = None) -> Listing:
    """List ``spec.source`` in ``spec.format`` (``auto``: by its name, then by its files);
    ``skip``: keys of DICOMweb instances an earlier version staged (``--since-last``)."""
    if dicomweb.is_dicomweb(spec.source):  # a PACS: QIDO-RS finds the instances
        return dicomweb_source.listing(spec, skip)
    names = spec.label_names or None
    fmt: str = spec.format
    if fmt == "auto":
        detected = detect_format(spec.source)
        fmt = "auto" if detected == "folder" else detected  # folders: DICOM by their files
    if fmt == "npz":
        return npz_source.npz_listing(spec.source, names, spec.max_pixels)
    kept: list[tuple[str, str]] = []
    bad: Counter[str] = Counter()
    if fmt == "csv":
        items = csv_source.csv_items(spec)
        has_splits, skipped = spec.split_column is not None, []
        kept = csv_source.attribute_columns(spec, csv_source.header(spec.source))
        for it in items:  # the job warns of them, with the DICOM ones, when it commits
            bad.update(it.get("attribute_bad") or ())
        table = items_table(items)
        del items
    else:
        tree = folder_items(spec.source, fmt, names)
        fmt, table, has_splits, skipped = tree.format, tree.table, tree.has_splits, tree.skipped
        if fmt == "dicom":
            kept = attributes.dicom_columns(spec.retain)
    # labels of the rows listing found no fault in, counted in Arrow (no object per row)
    good = table.column("labels").filter(pc.is_null(table.column("error_type")))
    found = sorted(pc.unique(pc.list_flatten(good)).to_pylist())
    # a manifest is multi-label unless every row names exactly one label (a plain class column)
    multi = fmt == "csv" and bool(pc.any(pc.not_equal(pc.list_value_length(good), 1)).as_py())
    return Listing(fmt, table, table.num_rows, list(names) if names else found, multi,
                   has_splits, len(skipped), skipped[:5], tuple(kept), dict(sorted(bad.items())))
