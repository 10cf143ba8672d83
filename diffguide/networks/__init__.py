"""Networks shared by the metrics, the classifiers and training (not models that are sampled from)."""
