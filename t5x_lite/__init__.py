"""t5x_lite: T5-style text-to-text transformers in JAX/Flax."""
