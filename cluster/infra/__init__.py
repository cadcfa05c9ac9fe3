"""Infrastructure every job shares: the local Ray cluster, the Jobs API client, the embedded S3
server, costs, environment names, job logging, the job context and the wire to the CLI.

Shared by every job package, so nothing here imports one.
"""
