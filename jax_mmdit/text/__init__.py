"""Text conditioning: encoders (CLIP, T5, SD3's combination) run once over captions or prompts."""

from jax_mmdit.text.encoders import TextEmbeddings, TextEncoder, TextEncoderConfig, identity

__all__ = ["TextEmbeddings", "TextEncoder", "TextEncoderConfig", "identity"]
