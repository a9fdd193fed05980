"""Filter stage."""
