"""The score job: a dataset version through a model version into a committed run.

- ``precheck``: the CLI process, before submitting (no Ray): references, resume, GPUs, sizes;
- ``job``: ``run(spec, lake, ctx)`` on the job driver: start or resume the run, the pipeline;
- ``remote``: what Ray runs elsewhere: the shard readers and the scorer actors;
- ``commit``: prediction and error files per shard, the index and the commit marker.
"""
