"""DiT and SD3-style MMDiT in Flax NNX.

    cfg = ModelConfig.from_preset("DiT-S/2", image_size=32, in_channels=3, num_classes=10)
    model = create_model(cfg, rngs=nnx.Rngs(0))
    v_BxHxWxC = model(x_BxHxWxC, t_B, y_B)      # t in [0, 1]; y == cfg.num_classes is the null class
"""

from __future__ import annotations

from flax import nnx

from jax_mmdit.models.config import PRESETS, ModelConfig
from jax_mmdit.models.convert import dit_from_diffusers, mmdit_from_diffusers
from jax_mmdit.models.dit import DiT
from jax_mmdit.models.mmdit import MMDiT
from jax_mmdit.models.summary import count_params, model_summary


def create_model(cfg: ModelConfig, rngs: nnx.Rngs) -> DiT | MMDiT:
    """Build the network `cfg.arch` names; parameters are float32."""
    if cfg.arch == "dit":
        return DiT(cfg, rngs)
    return MMDiT(cfg, rngs)


__all__ = [
    "PRESETS",
    "DiT",
    "MMDiT",
    "ModelConfig",
    "count_params",
    "create_model",
    "dit_from_diffusers",
    "mmdit_from_diffusers",
    "model_summary",
]
