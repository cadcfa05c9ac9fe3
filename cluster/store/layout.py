"""Every path in the lake, in one place. Other modules ask this one; none spells a lake path.

All paths are relative to the lake root, with '/' separators::

    datasets/<name>/<version>/manifest.json            commit point of a staging job
    datasets/<name>/<version>/shards/<part>.parquet     images (pixels, labels, split, ...)
    datasets/<name>/<version>/errors/<part>.parquet     inputs that could not be staged
    models/<name>/<version>/model.keras                 weights, published with the card
    models/<name>/<version>/card.json                   the model card: commit point of a version
    models/<name>/aliases.json                          alias -> version (e.g. prod -> 3)
    models/<name>/_training/<train id>/                 spec, checkpoints/, tensorboard/, final/
    features/<key>/<dataset>/<version>/<part>.parquet   cached backbone features (head mode)
    runs/<run_id>/run.json                              what a run scores, frozen at first start
    runs/<run_id>/actors/<actor>.json                   where each scorer actor ran
    runs/<run_id>/predictions/[date=D/]<shard>.parquet  one per input shard
    runs/<run_id>/errors/[date=D/]<shard>.parquet       images that could not be scored
    runs/<run_id>/usage/<job_id>.json                   CPU/GPU-seconds and cost of each job
    runs/<run_id>/report/                               report tables, report.html, heatmaps/
    runs/<run_id>/_COMMITTED.json                       commit point of a run: lists its files
    indexes/scored/<model>/<version>/<dataset>/<run_id>.parquet   ids a committed run scored
    jobs/<job_id>.json                                  job history (status, who, refs, log tail)

A reader sees a dataset version, model version or run only after its commit point exists.
"""

from __future__ import annotations

DATASETS = "datasets"
MODELS = "models"
RUNS = "runs"
JOBS = "jobs"
MANIFEST = "manifest.json"
CARD = "card.json"
MODEL_FILE = "model.keras"
RUN_COMMIT = "_COMMITTED.json"
RUN_DOC = "run.json"


# datasets ---------------------------------------------------------------------------------------
def dataset_root(name: str) -> str:
    return f"{DATASETS}/{name}"


def dataset_version(name: str, version: int) -> str:
    return f"{DATASETS}/{name}/{version}"


def manifest(name: str, version: int) -> str:
    return f"{dataset_version(name, version)}/{MANIFEST}"


def shard(name: str, version: int, part: str) -> str:
    return f"{dataset_version(name, version)}/shards/{part}"


def dataset_error_file(name: str, version: int, part: str) -> str:
    return f"{dataset_version(name, version)}/errors/{part}"


def shard_stem(path: str) -> str:
    """'datasets/cxr/1/shards/part-00003.parquet' -> 'cxr.1.part-00003' (unique per dataset)."""
    parts = path.split("/")
    return f"{parts[1]}.{parts[2]}.{parts[-1].removesuffix('.parquet')}"


# models -----------------------------------------------------------------------------------------
def model_root(name: str) -> str:
    return f"{MODELS}/{name}"


def model_version(name: str, version: int) -> str:
    return f"{MODELS}/{name}/{version}"


def model_file(name: str, version: int) -> str:
    return f"{model_version(name, version)}/{MODEL_FILE}"


def model_card(name: str, version: int) -> str:
    return f"{model_version(name, version)}/{CARD}"


def model_aliases(name: str) -> str:
    return f"{MODELS}/{name}/aliases.json"


def trainings(model: str) -> str:
    return f"{MODELS}/{model}/_training"


def training(model: str, train_id: str) -> str:
    return f"{trainings(model)}/{train_id}"


def features_root(key: str) -> str:
    return f"features/{key}"


def feature_file(key: str, shard_path: str) -> str:
    """'datasets/cxr/2/shards/part-00003.parquet' -> 'features/<key>/cxr/2/part-00003.parquet'."""
    parts = shard_path.split("/")
    return f"{features_root(key)}/{parts[1]}/{parts[2]}/{parts[-1]}"


# runs -------------------------------------------------------------------------------------------
def run_root(run_id: str) -> str:
    return f"{RUNS}/{run_id}"


def run_file(run_id: str, rel: str) -> str:
    """A file a run's commit marker lists (its paths are relative to the run's folder)."""
    return f"{run_root(run_id)}/{rel}"


def run_commit(run_id: str) -> str:
    return f"{run_root(run_id)}/{RUN_COMMIT}"


def run_doc(run_id: str) -> str:
    return f"{run_root(run_id)}/{RUN_DOC}"


def run_actor(run_id: str, actor: str) -> str:
    return f"{run_root(run_id)}/actors/{actor}.json"


def run_predictions(date_dir: str, stem: str) -> str:
    """Relative to the run's folder, as the commit marker lists it."""
    return f"predictions/{date_dir}{stem}.parquet"


def run_errors(date_dir: str, stem: str) -> str:
    """Relative to the run's folder, as the commit marker lists it."""
    return f"errors/{date_dir}{stem}.parquet"


def run_usage_dir(run_id: str) -> str:
    return f"{run_root(run_id)}/usage"


def run_usage(run_id: str, job_id: str) -> str:
    return f"{run_usage_dir(run_id)}/{job_id}.json"


def run_report(run_id: str) -> str:
    return f"{run_root(run_id)}/report"


def scored_index_dir(model: str, version: int, dataset: str) -> str:
    return f"indexes/scored/{model}/{version}/{dataset}"


def scored_inflight(model: str, version: int, dataset: str) -> str:
    """Runs with --only-new that have started and not yet committed (one JSON file each)."""
    return f"{scored_index_dir(model, version, dataset)}/_inflight"


def scored_index(model: str, version: int, dataset: str, run_id: str) -> str:
    return f"{scored_index_dir(model, version, dataset)}/{run_id}.parquet"


# jobs -------------------------------------------------------------------------------------------
def job_record(job_id: str) -> str:
    return f"{JOBS}/{job_id}.json"
