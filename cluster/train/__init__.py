"""The train job: Ray Train (TensorFlow MultiWorkerMirroredStrategy) on a staged dataset, with
checkpoints in the lake, registering the best epoch as the next model version.

- ``precheck``: the CLI process, before submitting (no Ray): dataset, arch, ``--weights``,
  ImageNet reachability, ``--run-id`` reuse; run again on the driver;
- ``job``: ``run(spec, lake, ctx)`` on the job driver: plan, resources, trainer, registration;
- ``remote``: what Ray Train runs in its workers (or the driver, for one CPU worker): steps,
  validation, checkpoints, final model;
- ``in_driver``: a one-worker CPU training in the job's driver (Ray Train's local mode): the
  worker's CPUs held on the driver's node, a retry after trouble that may pass;
- ``restarts``: which worker failures Ray Train retries, and the record of each restart;
- ``backend``: Ray Train's backend for TensorFlow (each worker's ``TF_CONFIG``);
- ``plan``: the frozen ``TrainPlan`` the driver hands whole to every worker;
- ``data``: shard and feature readers, row counts, the Ray Data datasets;
- ``weights``: initial weights (``--weights``) and the model training starts from;
- ``features``: the head-mode feature cache; ``checkpoints``: training ids, resume, checkpoints.
"""
