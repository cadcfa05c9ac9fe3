"""The report job: a committed scoring run -> metrics with patient-level CIs, calibration, drift,
a paired comparison and Grad-CAM heatmaps, as Parquet tables and one self-contained HTML page.

- ``precheck``: the CLI process, before submitting (no Ray): the runs named must be committed;
- ``job``: ``run(spec, lake, ctx)`` on the job driver: read, compute, write, commit;
- ``remote``: what Ray runs elsewhere: file and key readers, one label's metrics, Grad-CAM;
- ``inputs``: the parallel reads of a run's predictions and its dataset's patient keys;
- ``heatmaps``: picking, starting and writing the Grad-CAM overlays.
- ``local_copy``: the CLI process: the committed HTML and its images into a local folder.

The numbers themselves are pure code in ``workers/`` (``run_data``, ``evaluation``,
``bootstrap``, ``report_tables``, ``report_html``).
"""
