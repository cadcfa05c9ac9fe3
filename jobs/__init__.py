"""The CLI, the SDK it calls, validated job specs, and the entrypoints that run on the cluster."""
