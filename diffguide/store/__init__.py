"""Run storage: the sample store, metrics.json and failed.json, the run fingerprint, checkpoints, atomic writes."""
