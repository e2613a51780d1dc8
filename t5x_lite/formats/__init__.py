"""Readers and writers of other libraries' checkpoints (Hugging Face transformers, ...)."""
