"""The stage job: image collections into versioned, de-identified Parquet datasets.

- ``precheck``: the CLI process, before submitting (no Ray): source, format, CSV columns;
- ``job``: ``run(spec, lake, ctx)`` on the job driver: list, decode, write, commit;
- ``remote``: what Ray runs elsewhere: the batch decoders; ``crash``: their crash guard;
- ``sources`` picks the lister: ``listing`` (folders, S3 prefixes, single files),
  ``csv_source`` (CSV/TSV manifests), ``npz_source`` (MedMNIST arrays, and the tasks that
  stream them);
- ``pipeline``: decoder actors from a listing to decoded batches, in order, retries bounded;
- ``writer``: balanced shards and the errors table; ``reuse``: the previous version's shards;
- ``dicomweb_source``: a PACS listed by QIDO-RS, its instances retrieved by WADO-RS;
- ``purge``: deleting versions, reading errors (the private DICOM path linkage the job writes
  lives in ``medray.cluster.store.linkage``: the publish job reads it too).
"""
