"""Infrastructure every job shares: the local Ray cluster (fixed, or grown by Ray's autoscaler:
``autoscale``), the Jobs API client, the embedded S3 server, costs, environment names, job
logging, the job context, the wire to the CLI, fault hooks and how a stopped job driver ends
(``stopping``).

Shared by every job package, so nothing here imports one.
"""
