"""_sweep layer."""
