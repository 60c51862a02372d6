"""_check layer."""
