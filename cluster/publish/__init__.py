"""The publish job: a scored run's results back to the PACS as DICOM Structured Reports.

- ``precheck``: the CLI process, before submitting (no Ray): the run is committed, the target
  parses, the auth file is private;
- ``job``: ``run(spec, lake, ctx)`` on the job driver: the run's rows joined to the original
  UIDs through the staging's private linkage, handed out in batches;
- ``remote``: what Ray runs elsewhere: per batch, each original's attributes by WADO-RS
  metadata, one SR each (``workers.sr``), one STOW-RS request.
"""
