"""The train job: Ray Train (TensorFlow MultiWorkerMirroredStrategy) on a staged dataset, with
checkpoints in the lake, registering the best epoch as the next model version.

- ``precheck``: the CLI process, before submitting (no Ray): dataset, arch, ``--weights``,
  ImageNet reachability, ``--run-id`` reuse; run again on the driver;
- ``job``: ``run(spec, lake, ctx)`` on the job driver: plan, resources, trainer, registration;
- ``remote``: what Ray Train runs in its workers: steps, validation, checkpoints, final model;
- ``plan``: the frozen ``TrainPlan`` the driver hands whole to every worker;
- ``data``: shard and feature readers, row counts, the Ray Data datasets;
- ``weights``: initial weights (``--weights``) and the model training starts from;
- ``features``: the head-mode feature cache; ``checkpoints``: training ids, resume, checkpoints.
"""
