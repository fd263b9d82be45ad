"""jax-mmdit: DiT and MMDiT with Rectified Flow in JAX/Flax NNX."""

__version__ = "0.1.0"
