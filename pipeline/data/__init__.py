"""Inputs: song sources, manifest, licences, audio, front-ends, the mel and teacher caches, training data."""
