"""Hugging Face checkpoints: the format, loading, writing back, and GGUF files."""
