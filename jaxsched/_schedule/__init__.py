"""_schedule layer."""
