"""The VAE of latent diffusion: `AutoencoderKL` (NNX), diffusers-format weights, and the
encode/decode runners that turn images into latent shards and samples back into pictures."""

from jax_mmdit.vae.config import VAE_PRESETS, VAEConfig
from jax_mmdit.vae.model import AutoencoderKL
from jax_mmdit.vae.weights import load_vae, save_vae, vae_identity

__all__ = ["VAE_PRESETS", "AutoencoderKL", "VAEConfig", "load_vae", "save_vae", "vae_identity"]
