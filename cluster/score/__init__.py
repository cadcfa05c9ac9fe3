"""The score job: a dataset version through a model version into a committed run.

- ``precheck``: the CLI process, before submitting (no Ray): references, resume, GPUs, sizes,
  and the run's lease taken for the job about to be submitted;
- ``job``: ``run(spec, lake, ctx)`` on the job driver: the lease, start or resume the run, the
  pipeline;
- ``remote``: what Ray runs elsewhere: the shard readers and the scorer actors;
- ``commit``: prediction and error files per shard, the index and the commit marker;
- ``resume``: which of an earlier attempt's prediction files a resume may keep;
- ``usage``: what each attempt used, recorded however it ends;
- ``sizing``: the scorer pool's actors, threads and batch when no flag sets them.
"""
