"""Stable Diffusion + LoRA synthesis as plain functions."""
