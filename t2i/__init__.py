"""t2i: a JAX/Flax training stack for text-to-image models."""
