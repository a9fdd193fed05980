"""Datasets: manifests, image decoding, validation and the built-in sample."""
