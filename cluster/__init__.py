"""Everything that touches infrastructure: the local Ray cluster and Jobs API client, the lake
(local folders and S3 through pyarrow), and the embedded SeaweedFS S3 server."""
