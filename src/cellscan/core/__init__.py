"""Core: images, data, the network, training, scoring and the model bundle (no MLOps, no serving)."""
