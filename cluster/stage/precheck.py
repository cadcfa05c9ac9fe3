"""Checks of a stage spec in the CLI process, before anything is submitted (no Ray).

Only what is cheap and certain, so a wrong path or column costs no cluster job: the source
exists, its format can be told, a CSV manifest has the columns the spec names, an .npz has
MedMNIST's image arrays. Local paths are checked only when the cluster runs on this machine (a
remote cluster reads its own disks). An s3:// source gets one metadata request, never a listing;
when storage cannot answer from here, the job on the cluster decides.
"""

from __future__ import annotations

import logging
import zipfile
import zlib

import pyarrow.fs as pafs

from medray.cluster.infra import ray_local
from medray.cluster.infra.dicomweb_client import check_auth_file
from medray.cluster.stage import csv_source, npz_source
from medray.cluster.stage.listing import detect_format
from medray.cluster.store.lake import Lake, source_filesystem
from medray.workers import dicomweb
from medray.workers.errors import NotFoundError
from medray.workers.specs import StageSpec

log = logging.getLogger(__name__)
# What reading a malformed file can raise besides medray's own errors: the precheck leaves
# such files to the job, which reports them with the input they came from.
_UNSURE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def precheck(spec: StageSpec, lake: Lake, address: str | None) -> None:
    """The stage precheck (``lake`` is not needed: staging only writes to it)."""
    local_files = ray_local.is_local(address)
    if dicomweb.is_dicomweb(spec.source):
        # the PACS is queried by the job, not from here; an auth file on this machine is the
        # cluster's only when the cluster runs here: then its mode is checked now (exit 2)
        if spec.auth_file and local_files:
            check_auth_file(spec.auth_file)
        return
    check_source(spec, local_files=local_files)


def check_source(spec: StageSpec, local_files: bool) -> None:
    """NotFoundError or ConfigError, naming the fix, for a source the job would refuse.

    ``local_files``: whether local paths mean the same files here as on the cluster."""
    fs, _ = source_filesystem(spec.source)  # an unsupported URI scheme fails here
    local = isinstance(fs, pafs.LocalFileSystem)
    _require(spec.source, local_files,
             f"source not found: {spec.source}: give an existing folder, file or "
             "s3://bucket/prefix")
    if not local or not local_files:
        return  # a remote source is not read here beyond its existence
    fmt = detect_format(spec.source) if spec.format == "auto" else spec.format
    try:
        if fmt == "csv":
            if spec.images_root:
                _require(spec.images_root, local_files,
                         f"--images-root not found: {spec.images_root}: give the folder the "
                         "manifest's paths are relative to")
            csv_source.check_columns(spec, csv_source.header(spec.source))
        elif fmt == "npz":
            npz_source.image_arrays(spec.source, npz_source.npz_members(spec.source))
    except _UNSURE as exc:
        log.debug("precheck could not read %s (%s): the job will", spec.source, exc)


def _require(uri: str, local_files: bool, missing: str) -> None:
    """NotFoundError(``missing``) when ``uri`` surely does not exist."""
    fs, path = source_filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem) and not local_files:
        return
    try:
        info = fs.get_file_info(path)
    except OSError as exc:  # storage refused or unreachable from here: not a verdict
        log.debug("precheck cannot see %s: %s", uri, exc)
        return
    if info.type == pafs.FileType.NotFound:
        raise NotFoundError(missing)
