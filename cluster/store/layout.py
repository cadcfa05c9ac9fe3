"""Every path in the lake, in one place. Other modules ask this one; none spells a lake path.

All paths are relative to the lake root, with '/' separators::

    datasets/<name>/<version>/manifest.json            commit point of a staging job
    datasets/<name>/<version>/shards/<part>.parquet     images (pixels, labels, split, ...)
    datasets/<name>/<version>/errors/<part>.parquet     inputs that could not be staged
    datasets/<name>/<version>/_staging.json             a staging job at work (gone at commit)
    datasets/<name>/<version>/dicomweb.parquet          keyed hashes of the PACS instances staged
    datasets/<name>/<version>/_CLAIM.json               who claimed the version number (first)
    models/<name>/<version>/model.keras                 weights, published with the card
    models/<name>/<version>/card.json                   the model card: commit point of a version
    models/<name>/<version>/_CLAIM.json                 who claimed the version number (first)
    models/<name>/aliases.json                          alias -> version (e.g. prod -> 3)
    models/<name>/_training/latest.json                 the training --resume alone continues
    models/<name>/_training/<train id>/spec.json        the spec a training started with
    models/<name>/_training/<train id>/init/<file>      an uploaded --weights file
    models/<name>/_training/<train id>/checkpoints/     epoch-NNNN/{model.weights.h5,
                                                        optimizer.npz,state.json}, latest.json,
                                                        best.weights.h5
    models/<name>/_training/<train id>/tensorboard/     event files, uploaded every epoch
    models/<name>/_training/<train id>/ranks/<job>-rank<r>.json   steps each worker ran
    models/<name>/_training/<train id>/final/           model.keras, result.json, registered.json
    features/<key>/<dataset>/<version>/<part>.parquet   cached backbone features (head mode)
    features/<key>/<dataset>/<version>/<part>.json      commit point of one feature file
    features/<key>/_key.json, _events/<job_id>.json     what the key covers; who computed what
    runs/<run_id>/run.json                              what a run scores, frozen at first start
    runs/<run_id>/_LEASE.json                           which job may write the run, heartbeat
    runs/<run_id>/actors/<actor>.json                   where each scorer actor ran
    runs/<run_id>/predictions/[date=D/]<shard>.parquet  one per input shard
    runs/<run_id>/errors/[date=D/]<shard>.parquet       images that could not be scored
    runs/<run_id>/usage/<job_id>.json                   CPU/GPU-seconds and cost of each job
    runs/<run_id>/report/                               report tables, report.html, heatmaps/
    runs/<run_id>/report/heatmaps/<label>/<NN>-<id>.png   a Grad-CAM overlay (label made path-safe)
    runs/<run_id>/report/_COMMITTED.json                commit point of a report, written last
    runs/<run_id>/_COMMITTED.json                       commit point of a run: lists its files
    indexes/scored/<model>/<version>/<dataset>/<run_id>.parquet   ids a committed run scored
    indexes/scored/<model>/<version>/<dataset>/_inflight/<run_id>.json   --only-new, uncommitted
    jobs/<job_id>.json                                  job history (status, who, refs, log tail)
    _doctor/<token>.probe                               `medray doctor`'s write probe (deleted)

A reader sees a dataset version, model version or run only after its commit point exists.
"""

from __future__ import annotations

import re

DATASETS = "datasets"
MODELS = "models"
RUNS = "runs"
JOBS = "jobs"
MANIFEST = "manifest.json"
CARD = "card.json"
MODEL_FILE = "model.keras"
RUN_COMMIT = "_COMMITTED.json"
RUN_DOC = "run.json"
CLAIM = "_CLAIM.json"
LEASE = "_LEASE.json"


# datasets ---------------------------------------------------------------------------------------
def dataset_root(name: str) -> str:
    return f"{DATASETS}/{name}"


def dataset_version(name: str, version: int) -> str:
    return f"{DATASETS}/{name}/{version}"


def manifest(name: str, version: int) -> str:
    return f"{dataset_version(name, version)}/{MANIFEST}"


def shard(name: str, version: int, part: str) -> str:
    return f"{dataset_version(name, version)}/shards/{part}"


def dataset_errors_dir(name: str, version: int) -> str:
    return f"{dataset_version(name, version)}/errors"


def dataset_error_file(name: str, version: int, part: str) -> str:
    return f"{dataset_version(name, version)}/errors/{part}"


def dataset_claim(name: str, version: int) -> str:
    """Created only if absent before anything is written under the version: the claim that
    makes the version number this staging's alone."""
    return f"{dataset_version(name, version)}/{CLAIM}"


def dicomweb_instances(name: str, version: int) -> str:
    """Keyed hashes (never the UIDs) of the DICOMweb instances a version staged: what
    ``--since-last`` leaves out next time."""
    return f"{dataset_version(name, version)}/dicomweb.parquet"


def staging_marker(name: str, version: int) -> str:
    """Which job is staging a version: written first, deleted at the commit or on failure."""
    return f"{dataset_version(name, version)}/_staging.json"


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


def model_claim(name: str, version: int) -> str:
    """Created only if absent before the weights and card: the version is this registration's."""
    return f"{model_version(name, version)}/{CLAIM}"


def model_aliases(name: str) -> str:
    return f"{MODELS}/{name}/aliases.json"


def trainings(model: str) -> str:
    return f"{MODELS}/{model}/_training"


def training(model: str, train_id: str) -> str:
    return f"{trainings(model)}/{train_id}"


def latest_training(model: str) -> str:
    """Which training of the model ``--resume`` without ``--run-id`` continues."""
    return f"{trainings(model)}/latest.json"


def training_spec(model: str, train_id: str) -> str:
    return f"{training(model, train_id)}/spec.json"


def training_init(model: str, train_id: str, name: str) -> str:
    """A ``--weights`` file uploaded beside the training, for workers on other nodes."""
    return f"{training(model, train_id)}/init/{name}"


def training_board(model: str, train_id: str) -> str:
    return f"{training(model, train_id)}/tensorboard"


def training_rank(model: str, train_id: str, job_id: str, rank: int) -> str:
    return f"{training(model, train_id)}/ranks/{job_id}-rank{rank}.json"


def training_model(model: str, train_id: str) -> str:
    """The best epoch's full model, written by rank 0 when training ends."""
    return f"{training(model, train_id)}/final/{MODEL_FILE}"


def training_result(model: str, train_id: str) -> str:
    """Thresholds and the training state, written by rank 0 after the model."""
    return f"{training(model, train_id)}/final/result.json"


def training_registered(model: str, train_id: str) -> str:
    """The version a finished training registered: a resumed finished training returns it."""
    return f"{training(model, train_id)}/final/registered.json"


def checkpoints(model: str, train_id: str) -> str:
    return f"{training(model, train_id)}/checkpoints"


def checkpoint_latest(model: str, train_id: str) -> str:
    """Points at the last committed epoch folder: the training has started once it exists."""
    return f"{checkpoints(model, train_id)}/latest.json"


def checkpoint_best(model: str, train_id: str) -> str:
    return f"{checkpoints(model, train_id)}/best.weights.h5"


def checkpoint_epoch(model: str, train_id: str, epoch: int) -> str:
    return f"{checkpoints(model, train_id)}/epoch-{epoch:04d}"


# the files of one epoch folder, as ``checkpoint_epoch`` names it and latest.json records it
def checkpoint_weights(epoch_dir: str) -> str:
    return f"{epoch_dir}/model.weights.h5"


def checkpoint_optimizer(epoch_dir: str) -> str:
    return f"{epoch_dir}/optimizer.npz"


def checkpoint_state(epoch_dir: str) -> str:
    """Written last: the epoch's commit point."""
    return f"{epoch_dir}/state.json"


def features_root(key: str) -> str:
    return f"features/{key}"


def features_key(key: str) -> str:
    """What the key's hash covers (arch, input size, weights identity...), for a reader."""
    return f"{features_root(key)}/_key.json"


def features_event(key: str, job_id: str) -> str:
    """Which shards one job computed, and when."""
    return f"{features_root(key)}/_events/{job_id}.json"


def feature_file(key: str, shard_path: str) -> str:
    """'datasets/cxr/2/shards/part-00003.parquet' -> 'features/<key>/cxr/2/part-00003.parquet'."""
    parts = shard_path.split("/")
    return f"{features_root(key)}/{parts[1]}/{parts[2]}/{parts[-1]}"


def feature_marker(feature_path: str) -> str:
    """The JSON beside a feature file, written after it: its commit point."""
    return feature_path.removesuffix(".parquet") + ".json"


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


def run_lease(run_id: str) -> str:
    """The one job allowed to write the run: owner, heartbeat, the attempts it replaced."""
    return f"{run_root(run_id)}/{LEASE}"


def run_actors_dir(run_id: str) -> str:
    return f"{run_root(run_id)}/actors"


def run_actor(run_id: str, actor: str) -> str:
    return f"{run_root(run_id)}/actors/{actor}.json"


def run_predictions_dir(run_id: str) -> str:
    return f"{run_root(run_id)}/predictions"


def run_errors_dir(run_id: str) -> str:
    return f"{run_root(run_id)}/errors"


def date_partition(day: str) -> str:
    """'2024-05-01' -> 'date=2024-05-01/': the folder --partition-by date adds (the date_dir)."""
    return f"date={day}/"


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


def run_report_table(run_id: str, name: str) -> str:
    """A report table: summary, per_label_metrics, thresholds, calibration, drift, compare or
    heatmaps."""
    return f"{run_report(run_id)}/{name}.parquet"


def run_report_html(run_id: str) -> str:
    return f"{run_report(run_id)}/report.html"


def run_report_commit(run_id: str) -> str:
    return f"{run_report(run_id)}/{RUN_COMMIT}"


def run_report_heatmaps(run_id: str) -> str:
    return f"{run_report(run_id)}/heatmaps"


def run_report_heatmap(run_id: str, label: str, rank: int, image_id: str) -> str:
    """One Grad-CAM overlay: the label as a safe path segment, its rank, the image id's start."""
    segment = re.sub(r"[^A-Za-z0-9_.-]", "_", label) or "_"
    return f"{run_report_heatmaps(run_id)}/{segment}/{rank:02d}-{image_id[:16]}.png"


def prediction_stem(rel: str) -> str:
    """'predictions/date=D/cxr.1.part-00003.parquet' -> 'cxr.1.part-00003': the ``shard_stem`` of
    the dataset shard that a prediction file (as a run's commit marker lists it) scored."""
    return rel.rsplit("/", 1)[-1].removesuffix(".parquet")


def scored_index_dir(model: str, version: int, dataset: str) -> str:
    return f"indexes/scored/{model}/{version}/{dataset}"


def scored_inflight(model: str, version: int, dataset: str) -> str:
    """Runs with --only-new that have started and not yet committed (one JSON file each)."""
    return f"{scored_index_dir(model, version, dataset)}/_inflight"


def scored_inflight_run(model: str, version: int, dataset: str, run_id: str) -> str:
    return f"{scored_inflight(model, version, dataset)}/{run_id}.json"


def scored_index(model: str, version: int, dataset: str, run_id: str) -> str:
    return f"{scored_index_dir(model, version, dataset)}/{run_id}.parquet"


# jobs -------------------------------------------------------------------------------------------
def job_record(job_id: str) -> str:
    return f"{JOBS}/{job_id}.json"


# doctor -----------------------------------------------------------------------------------------
DOCTOR = "_doctor"


def doctor_probe(token: str) -> str:
    """The object ``medray doctor`` writes, reads back and deletes to prove the lake writable."""
    return f"{DOCTOR}/{token}.probe"
