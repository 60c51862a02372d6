"""_control layer."""
