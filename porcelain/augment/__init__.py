"""Augment stage."""
