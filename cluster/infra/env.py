"""Every environment variable medray reads, and the ones a job carries to the cluster.

One home for the names: a module that reads ``MEDRAY_*`` imports the constant from here.
"""

from __future__ import annotations

import os

HOME = "MEDRAY_HOME"  # where medray keeps its state (default ~/.medray)
LAKE = "MEDRAY_LAKE"  # the lake URI when --lake is not given
JOB_ID = "MEDRAY_JOB_ID"  # set by the CLI on every job; stamped on every job log line
JOB_PYTHON = "MEDRAY_JOB_PYTHON"  # the interpreter a remote cluster runs jobs with
SUBMITTED_AT = "MEDRAY_SUBMITTED_AT"
SUBMITTED_BY = "MEDRAY_SUBMITTED_BY"
PRICES = "MEDRAY_PRICES"  # a price table file (configs/cluster/prices.yaml); unset: no cost
PRICES_JSON = "MEDRAY_PRICES_JSON"  # the price table as the job receives it (not secret)
STORAGE_RETRY_SECONDS = "MEDRAY_STORAGE_RETRY_SECONDS"  # how long transient storage errors retry
DEID_SALT = "MEDRAY_DEID_SALT"  # the de-identification salt, when not in MEDRAY_HOME
DEID_SALT_FILE = "MEDRAY_DEID_SALT_FILE"  # a file holding it (a mounted secret on clusters)
# DICOMweb credentials (user:password or Bearer TOKEN), read on the node where a job runs;
# never passed to jobs (docs/pacs.md)
DICOMWEB_AUTH = "MEDRAY_DICOMWEB_AUTH"
FAULT = "MEDRAY_FAULT"  # fault injection for tests (see cluster/infra/faults.py)
# JSON overriding docs/pneumonia.ipynb's settings cell (its test makes the run small)
NOTEBOOK_SETTINGS = "MEDRAY_NOTEBOOK_SETTINGS"
# JSON {resource: most}: set by `medray cluster up --autoscale` on the head's processes, so a
# job may ask for what the autoscaler can add (cluster/infra/autoscale.py)
AUTOSCALE_MAX_RESOURCES = "MEDRAY_AUTOSCALE_MAX_RESOURCES"

# Other tools' names that medray reads too.
RAY_ADDRESS = "RAY_ADDRESS"  # the cluster when --address is not given
AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"  # an S3-compatible endpoint (boto3 and pyarrow read it)
AWS_ENDPOINT_URL_S3 = "AWS_ENDPOINT_URL_S3"  # the same, for S3 only
AWS_REGION = "AWS_REGION"
AWS_DEFAULT_REGION = "AWS_DEFAULT_REGION"
AWS_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"  # set: use the AWS chain, not the embedded lake's keys
RAY_JOB_STOP_WAIT = "RAY_JOB_STOP_WAIT_TIME_S"  # set on every job: Ray's SIGTERM-to-SIGKILL wait
# set by the train driver for Ray Train's controller: how often it asks the workers how they are
RAY_TRAIN_HEALTH_CHECK = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
# set on every job so its log holds what the CLI shows and not start-up noise (docs/output.md)
TF_CPP_MIN_LOG_LEVEL = "TF_CPP_MIN_LOG_LEVEL"  # 3: no TensorFlow C++ INFO/WARNING lines
RAY_DEDUP_LOGS_ALLOW_REGEX = "RAY_DEDUP_LOGS_ALLOW_REGEX"  # lines Ray never folds together
PYTHONWARNINGS = "PYTHONWARNINGS"  # warnings filters for every process of the job
# whether `medray report --open` has a browser to open (no console browser takes the terminal)
BROWSER = "BROWSER"
DISPLAY = "DISPLAY"
WAYLAND_DISPLAY = "WAYLAND_DISPLAY"
RAY_AUTH_TOKEN = "RAY_AUTH_TOKEN"  # Ray's token itself, or
RAY_AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"  # a file holding it
AWS_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"  # never printed: `medray doctor` says only "set"
AWS_SHARED_CREDENTIALS_FILE = "AWS_SHARED_CREDENTIALS_FILE"
AWS_PROFILE = "AWS_PROFILE"
AWS_WEB_IDENTITY_TOKEN_FILE = "AWS_WEB_IDENTITY_TOKEN_FILE"  # IRSA / OIDC on Kubernetes
AWS_CONTAINER_CREDENTIALS_FULL_URI = "AWS_CONTAINER_CREDENTIALS_FULL_URI"  # ECS/EKS pod identity
AWS_EC2_METADATA_DISABLED = "AWS_EC2_METADATA_DISABLED"

# What a job needs from the submitting environment. Nothing secret: credentials are found on
# the nodes themselves (AWS chain, MEDRAY_HOME files), never sent through job submission.
PASS_TO_JOBS = (
    HOME,
    LAKE,
    AWS_ENDPOINT_URL,
    AWS_ENDPOINT_URL_S3,
    AWS_REGION,
    STORAGE_RETRY_SECONDS,
    FAULT,
)


def get(name: str, default: str = "") -> str:
    """The variable's value; ``default`` when it is unset or empty."""
    return os.environ.get(name) or default
