"""Models stage."""
