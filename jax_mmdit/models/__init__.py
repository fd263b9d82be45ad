"""DiT and SD3-style MMDiT in Flax NNX, written in the operations of `jax_mmdit.ops`.

    cfg = ModelConfig.from_preset("DiT-S/2", image_size=32, in_channels=3, num_classes=10)
    model = create_model(cfg, rngs=nnx.Rngs(0))   # or ops=jax_mmdit.ops.resolve("xla")
    v_BxHxWxC = model(x_BxHxWxC, t_B, y_B)      # t in [0, 1]; y == cfg.num_classes is the null class
    v = model(x, t, context_BxTxE=..., pooled_BxP=...)   # a text-conditioned MMDiT

- Everything is NHWC; the output is float32 whatever the compute dtype, with 2C channels under
  `learn_sigma` (the flow uses the first C). A fresh model outputs exactly 0 (adaLN-Zero).
- Parameters are float32 `nnx.Param`s; with `pos_embed="sincos"` the fixed table is a
  `FixedEmbedding` (checkpointed and counted, not trained). Models hold no mutable Python state
  and no sharding annotations (the trainer's table in `train/mesh.py` decides from shapes).
- With `num_classes=0` DiT ignores `y` and MMDiT uses its null-class tokens; with `num_classes>0`,
  `y` is required. Out-of-range labels give NaN outputs (jnp.take's "fill"), not silent clamping.
- `dit_from_diffusers` / `mmdit_from_diffusers` read diffusers' DiT and SD3/SD3.5 transformers,
  `dit_from_original` facebookresearch/DiT and SiT state dicts (module or state dict; torch is
  never imported there); `load_published(kind, path)` reads such checkpoints from files into
  (config, model); `model_summary(cfg)` gives parameters and FLOPs without building weights.
"""

from __future__ import annotations

from jax_mmdit.models.checkpoints import load_published
from jax_mmdit.models.config import PRESETS, ModelConfig
from jax_mmdit.models.convert import dit_from_diffusers, dit_from_original, mmdit_from_diffusers
from jax_mmdit.models.dit import DiT
from jax_mmdit.models.factory import create_model
from jax_mmdit.models.mmdit import MMDiT
from jax_mmdit.models.summary import count_params, model_summary

__all__ = [
    "PRESETS",
    "DiT",
    "MMDiT",
    "ModelConfig",
    "count_params",
    "create_model",
    "dit_from_diffusers",
    "dit_from_original",
    "load_published",
    "mmdit_from_diffusers",
    "model_summary",
]
