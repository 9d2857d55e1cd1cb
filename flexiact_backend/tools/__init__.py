"""The tools around the pipeline and the service: the CLI, benchmarks, doctor, the hub download."""
