"""_expansion layer."""
