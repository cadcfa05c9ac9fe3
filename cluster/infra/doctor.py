"""``medray doctor``: check the lake, its credentials, the cluster, its GPUs and Ray's spill
disk, and say for each problem the command that fixes it.

Each check is a plain function that returns a :class:`Check` and never raises, so one broken
piece never hides the report on the others. Nothing here starts Ray or imports TensorFlow: the
cluster is asked over HTTP (the dashboard that also serves the Jobs API), the lake through its
filesystem with one probe object under ``_doctor/``, and TensorFlow's view of each node's GPUs
by a small job the Jobs API runs on the cluster (``gpu_probe.py``). Credentials are named by
where they come from, never printed.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from medray.cluster.infra import env, ray_local
from medray.cluster.store import layout
from medray.cluster.store.lake import (
    Lake,
    classify,
    default_lake_uri,
    embedded_lake_config,
)
from medray.workers.errors import MedrayError

log = logging.getLogger(__name__)

# Ray stops spilling objects to a disk more than 95% full (local_fs_capacity_threshold); warn
# before that, and when little is left in absolute terms.
SPILL_MAX_USED = 0.90
SPILL_MIN_FREE_BYTES = 2 * 1024**3
HTTP_TIMEOUT_S = 5.0
_FIX_LAKE_UP = "`medray lake up` (the embedded lake), or pass --lake / set MEDRAY_LAKE"
_FIX_CLUSTER = "`medray cluster up` (a local cluster), or pass --address / set RAY_ADDRESS"
_FIX_CREDENTIALS = (
    "set the right AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for this endpoint, or unset "
    "them to use the embedded lake's own (`medray lake up`)"
)


@dataclass(frozen=True)
class Check:
    """One line of the report: ``ok`` or a problem, what was seen, and the fix for a problem."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False  # could not be checked (a line above says why); not a failure

    def line(self) -> str:
        word = "skipped" if self.skipped else "ok" if self.ok else "PROBLEM"
        head = f"{word:<8}{self.name:<12}{self.detail}"
        return head if self.ok or not self.fix else f"{head} -> fix: {self.fix}"


def _skip(name: str, why: str) -> Check:
    return Check(name, True, f"not checked: {why}", skipped=True)


def run_all(lake_uri: str | None, address: str | None) -> dict[str, Any]:
    """Every check, in the order the report lists them; ``ok`` is True when all passed."""
    uri = lake_uri or default_lake_uri()
    nodes, cluster = check_cluster(address)
    checks = [
        check_credentials(uri),
        check_lake(uri),
        cluster,
        check_gpus(nodes, cluster.ok),
        check_tensorflow_gpus(address, nodes),
        check_spill_disk(address),
    ]
    return {
        "ok": all(c.ok for c in checks),
        "lake": uri,
        "checks": [asdict(c) for c in checks],
    }


# credentials -------------------------------------------------------------------------------
def credentials_source(uri: str) -> Check:
    """Where the lake's S3 credentials come from (the order ``lake.s3_settings`` uses)."""
    if urlparse(uri).scheme != "s3":
        return Check("credentials", True, "none needed: the lake is a local folder")
    if env.get(env.AWS_ACCESS_KEY_ID):
        if not env.get(env.AWS_SECRET_ACCESS_KEY):
            return Check(
                "credentials",
                False,
                "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not",
                "export AWS_SECRET_ACCESS_KEY as well, or unset AWS_ACCESS_KEY_ID",
            )
        return Check("credentials", True, "from the environment (AWS_ACCESS_KEY_ID)")
    endpoint = env.get(env.AWS_ENDPOINT_URL_S3) or env.get(env.AWS_ENDPOINT_URL)
    cfg = embedded_lake_config()
    if not endpoint and cfg:
        path = Path(str(cfg.get("credentials_file", "")))
        if path.is_file():
            return Check("credentials", True, f"the embedded lake's key file ({path})")
        return Check(
            "credentials",
            False,
            f"the embedded lake's key file {path} is missing",
            "`medray lake down` then `medray lake up` (writes new keys)",
        )
    shared = Path(env.get(env.AWS_SHARED_CREDENTIALS_FILE) or Path.home() / ".aws" / "credentials")
    if shared.is_file():
        profile = env.get(env.AWS_PROFILE, "default")
        return Check("credentials", True, f"the AWS credentials file {shared} (profile {profile})")
    if env.get(env.AWS_WEB_IDENTITY_TOKEN_FILE) or env.get(env.AWS_CONTAINER_CREDENTIALS_FULL_URI):
        return Check("credentials", True, "the AWS chain (web identity / container role)")
    if not endpoint and env.get(env.AWS_EC2_METADATA_DISABLED).lower() != "true":
        return Check("credentials", True, "the AWS chain (instance role; the lake check tries it)")
    return Check(
        "credentials",
        False,
        "no S3 credentials in the environment, key files or the AWS chain",
        "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, run `aws configure`, or "
        "`medray lake up` for the embedded lake",
    )


def check_credentials(uri: str) -> Check:
    try:
        return credentials_source(uri)
    except Exception as exc:  # a doctor reports, it does not crash
        return Check("credentials", False, f"could not look: {exc}", "")


# lake --------------------------------------------------------------------------------------
def lake_fix(exc: BaseException, uri: str) -> str:
    """The command that fixes a failed lake probe, from the error's kind."""
    text = str(exc).upper()
    local = urlparse(uri).scheme in ("", "file")
    if local and (isinstance(exc, PermissionError) or "PERMISSION DENIED" in text):
        folder = urlparse(uri).path if uri.startswith("file:") else uri
        return f"`chmod u+rwx {folder}` or pass another --lake"
    if any(code in text for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE")):
        return _FIX_CREDENTIALS
    if "NO_SUCH_BUCKET" in text or "BUCKET" in text and "NOT EXIST" in text:
        return f"create the bucket or fix the lake URI: {_FIX_LAKE_UP}"
    if classify(exc) == "transient":
        return f"start the S3 server or fix AWS_ENDPOINT_URL: {_FIX_LAKE_UP}"
    return _FIX_LAKE_UP


def probe_lake(lake: Lake) -> None:
    """Write, read back and delete one object under ``_doctor/``, once each (no retries: a
    doctor answers in seconds); raises what the storage raised."""
    rel = layout.doctor_probe(uuid.uuid4().hex[:12])
    data = b"medray doctor probe\n"
    if not lake.is_local:
        bucket = lake.base.split("/", 1)[0]
        if lake.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"NO_SUCH_BUCKET: bucket {bucket!r} does not exist")
    if lake.is_local:
        lake.write_bytes(rel, data)  # the lake's own atomic write: the folder must take files
    else:
        _put(lake, rel, data)  # one PUT; the lake's writes would retry for a minute
    try:
        with lake.fs.open_input_stream(lake.path(rel)) as fh:
            if fh.read() != data:
                raise OSError(f"the probe {lake.full_uri(rel)} read back different bytes")
    finally:
        lake.fs.delete_file(lake.path(rel))


def _put(lake: Lake, rel: str, data: bytes) -> None:
    with lake.fs.open_output_stream(lake.path(rel)) as fh:
        fh.write(data)


def check_lake(uri: str) -> Check:
    try:
        probe_lake(Lake(uri))
    except Exception as exc:  # every failure is a line of the report
        state = "is unreachable" if classify(exc) == "transient" else "is not writable"
        return Check("lake", False, f"{uri} {state}: {_short(exc)}", lake_fix(exc, uri))
    where = "probe written, read and deleted under " + layout.DOCTOR
    return Check("lake", True, f"{uri} reachable and writable ({where}/)")


# cluster -----------------------------------------------------------------------------------
def _token(address: str | None) -> str | None:
    """The Ray auth token this client would send (never printed)."""
    if env.get(env.RAY_AUTH_TOKEN):
        return env.get(env.RAY_AUTH_TOKEN)
    paths = [env.get(env.RAY_AUTH_TOKEN_PATH)]
    if ray_local.is_local(address):
        paths.append(str(ray_local.token_path()))
    paths.append(str(Path.home() / ".ray" / "auth_token"))
    for p in paths:
        if p and Path(p).is_file():
            return Path(p).read_text().strip()
    return None


def _get_json(url: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, headers=headers)  # noqa: S310 - the user's own cluster
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:  # noqa: S310
        return json.loads(resp.read())


def version_check(url: str, cluster_version: str, client_version: str) -> Check:
    if cluster_version == client_version:
        return Check("cluster", True, f"{url} answers, Ray {cluster_version} (same as here)")
    return Check(
        "cluster",
        False,
        f"{url} runs Ray {cluster_version} but this client has Ray {client_version}",
        f"`pip install 'ray[default]=={cluster_version}'` here, or run the cluster with "
        f"Ray {client_version}",
    )


def check_cluster(address: str | None) -> tuple[list[dict[str, Any]] | None, Check]:
    """The cluster's version against this client's, and its alive nodes (None when it does
    not answer)."""
    try:
        url = ray_local.dashboard_url(address)
    except MedrayError:
        return None, Check(
            "cluster",
            False,
            "no Ray cluster: none local and no --address / RAY_ADDRESS",
            _FIX_CLUSTER,
        )
    token = _token(address)
    try:
        version = _get_json(f"{url}/api/version", token)
        nodes = _get_json(f"{url}/nodes?view=summary", token)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return None, Check(
                "cluster",
                False,
                f"{url} refused this client's Ray token (HTTP {exc.code})",
                "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token",
            )
        return None, Check("cluster", False, f"{url} answered HTTP {exc.code}", _FIX_CLUSTER)
    except (OSError, ValueError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return None, Check(
            "cluster", False, f"no Ray cluster answers at {url}: {_short(why)}", _FIX_CLUSTER
        )
    client = metadata.version("ray")
    return alive_nodes(nodes), version_check(url, str(version.get("ray_version")), client)


def alive_nodes(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Alive nodes and their GPUs from the dashboard's ``/nodes?view=summary`` answer."""
    out = []
    for node in payload.get("data", {}).get("summary", []):
        raylet = node.get("raylet", {})
        if raylet.get("state") == "ALIVE":
            res = raylet.get("resourcesTotal", {})
            accel = [k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")]
            out.append(
                {
                    "node": node.get("ip") or raylet.get("nodeManagerAddress", "?"),
                    "gpus": float(res.get("GPU", 0)),
                    "type": ",".join(accel),
                }
            )
    return out


# GPUs --------------------------------------------------------------------------------------
def check_gpus(nodes: list[dict[str, Any]] | None, cluster_ok: bool) -> Check:
    """What the cluster gives TensorFlow: the GPUs Ray schedules on each node (a TF actor
    sees exactly the GPUs Ray assigns it through CUDA_VISIBLE_DEVICES)."""
    if nodes is None:
        return _skip("gpus", "the cluster does not answer")
    if not nodes:
        return Check("gpus", False, "the cluster has no alive node", _FIX_CLUSTER)
    total = sum(n["gpus"] for n in nodes)
    per_node = ", ".join(
        f"{n['node']}: {n['gpus']:g}{' ' + n['type'] if n['type'] else ''}" for n in nodes
    )
    if total == 0:
        detail = f"no GPUs on {len(nodes)} node(s): TensorFlow jobs run on CPU ({per_node})"
    else:
        detail = f"{total:g} GPU(s) for TensorFlow on {len(nodes)} node(s) ({per_node})"
    return Check("gpus", True, detail)


_FIX_TF_MISSING_GPUS = (
    "install TensorFlow's CUDA build on that node (pip install 'tensorflow[and-cuda]') and "
    "check its driver with nvidia-smi"
)
PROBE_TIMEOUT_S = 240.0


def tensorflow_gpu_check(rows: list[dict[str, Any]]) -> Check:
    """Compare, node by node, the GPUs Ray schedules with the GPUs TensorFlow finds there."""
    name = "tensorflow"
    if not rows:
        return Check(name, False, "the probe job found no alive node", _FIX_CLUSTER)
    for row in rows:
        where, ray_gpus, tf_gpus = row["node"], float(row["ray_gpus"]), row["tf_gpus"]
        if tf_gpus is None:
            return Check(name, False, f"node {where}: TensorFlow did not answer: "
                         f"{_short(row.get('error'))}",
                         "install medray's dependencies on that node (pip install medray)")
        if tf_gpus < ray_gpus:
            return Check(name, False, f"node {where}: Ray schedules {ray_gpus:g} GPU(s) but "
                         f"TensorFlow sees {tf_gpus}"
                         f"{'' if row.get('cuda_build') else ' (a TensorFlow built without CUDA)'}",
                         _FIX_TF_MISSING_GPUS)
        if tf_gpus > ray_gpus:
            return Check(name, False, f"node {where}: TensorFlow sees {tf_gpus} GPU(s) that Ray "
                         f"schedules only {ray_gpus:g} of", f"start that node with "
                         f"`ray start --num-gpus {tf_gpus}` (or the node type's GPU resource)")
    total = sum(int(r["tf_gpus"]) for r in rows)
    return Check(name, True, f"TensorFlow sees {total} GPU(s) on {len(rows)} node(s), as many "
                 "as Ray schedules on each")


def check_tensorflow_gpus(address: str | None, nodes: list[dict[str, Any]] | None) -> Check:
    """Run ``gpu_probe`` on the cluster through the Jobs API and compare what it saw."""
    if nodes is None:
        return _skip("tensorflow", "the cluster does not answer")
    try:
        from medray.cluster.infra import jobs_client, wire

        client = jobs_client.client(address)
        job = client.submit_job(
            entrypoint=f"{jobs_client.job_python(address)} -m medray.cluster.infra.gpu_probe",
            runtime_env={"env_vars": {env.TF_CPP_MIN_LOG_LEVEL: "3"}},
            metadata={"medray_kind": "doctor"}, entrypoint_num_cpus=0)
        status, logs = jobs_client.wait(job, address, timeout_s=PROBE_TIMEOUT_S)
        if status not in jobs_client.TERMINAL:
            client.stop_job(job)
            return Check("tensorflow", False, f"the probe job {job} did not end within "
                         f"{PROBE_TIMEOUT_S:g}s", "see `medray jobs logs " + job + "`")
        result = wire.result_from_logs(logs)
        if status != "SUCCEEDED" or result is None:
            return Check("tensorflow", False, f"the probe job {job} ended {status}",
                         "see `medray jobs logs " + job + "`")
        return tensorflow_gpu_check(result["nodes"])
    except Exception as exc:  # a report line, never a crash
        return Check("tensorflow", False, f"could not ask the cluster: {_short(exc)}", "")


# spill disk --------------------------------------------------------------------------------
def spill_check(path: str, total: int, free: int) -> Check:
    used = 1 - free / total if total else 1.0
    detail = f"{free / 1024**3:.1f} GiB free of {total / 1024**3:.1f} GiB at {path}"
    if used >= SPILL_MAX_USED or free < SPILL_MIN_FREE_BYTES:
        return Check(
            "spill disk",
            False,
            f"{detail} ({used:.0%} used; Ray stops spilling at 95%)",
            f"free space on the disk that holds {path} (Ray's temp dir: its old session_* "
            "folders can go once the cluster is down)",
        )
    return Check("spill disk", True, f"{detail} for Ray's object spilling")


def check_spill_disk(address: str | None) -> Check:
    """Free disk under the local cluster's temp dir, where Ray spills objects."""
    try:
        if (address or env.get(env.RAY_ADDRESS)) and not ray_local.is_local(address):
            return _skip("spill disk", "a remote cluster spills on its own nodes")
        temp = str(ray_local.status().get("temp_dir") or "")
        if not temp:
            return _skip("spill disk", "no local cluster")
        existing = Path(temp)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        usage = shutil.disk_usage(existing)
        return spill_check(temp, usage.total, usage.free)
    except Exception as exc:  # a report line, never a crash
        return Check("spill disk", False, f"could not measure: {_short(exc)}", "")


def _short(exc: object) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
