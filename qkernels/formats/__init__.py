"""Checkpoint formats (GGUF, ...)."""
