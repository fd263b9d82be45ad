"""Parameter counts and forward FLOPs of a config, without materialising any weights.

FLOP convention: numbers come from XLA's HLO cost analysis of one jitted forward pass, which
counts a multiply-add as 2 FLOPs (plus elementwise ops, softmax, norms). The DiT paper's "Gflops"
(e.g. 118.6 for DiT-XL/2 at 32x32x4) count a multiply-add once, so compare `gmacs_per_image`
(= XLA FLOPs / 2) with the paper; it is within a few percent because matmuls dominate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_mmdit.models.config import ModelConfig
from jax_mmdit.models.layers import FixedEmbedding


def _abstract_model(cfg: ModelConfig) -> nnx.Module:
    from jax_mmdit.models import create_model  # package __init__ defines it; import at call time

    return nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))


def count_params(model: nnx.Module) -> dict[str, int]:
    """{"total", "trainable", "fixed"}: total counts the fixed sin-cos table, as DiT's paper does."""
    size = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))  # noqa: E731
    trainable = size(nnx.state(model, nnx.Param))
    fixed = size(nnx.state(model, FixedEmbedding))
    return {"total": trainable + fixed, "trainable": trainable, "fixed": fixed}


def _example_inputs(cfg: ModelConfig, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    spec = jax.ShapeDtypeStruct
    inputs = {
        "x_BxHxWxC": spec((batch, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32),
        "t_B": spec((batch,), jnp.float32),
    }
    if cfg.arch == "mmdit" and not cfg.uses_class_tokens:
        # FLOPs depend on the text length; we count num_context_tokens tokens.
        inputs["context_BxTxE"] = spec((batch, cfg.num_context_tokens, cfg.context_dim), jnp.float32)
        if cfg.pooled_dim > 0:
            inputs["pooled_BxP"] = spec((batch, cfg.pooled_dim), jnp.float32)
    elif cfg.num_classes > 0:
        inputs["y_B"] = spec((batch,), jnp.int32)
    return inputs


def forward_flops(cfg: ModelConfig, batch: int = 1) -> float:
    """XLA-counted FLOPs of one forward pass over `batch` images (lowering only, no compile)."""
    graphdef, state = nnx.split(_abstract_model(cfg))

    def forward(state: nnx.State, inputs: dict[str, jax.Array]) -> jax.Array:
        return nnx.merge(graphdef, state)(**inputs)

    cost = jax.jit(forward).lower(state, _example_inputs(cfg, batch)).cost_analysis()
    if not cost or "flops" not in cost:
        raise RuntimeError("XLA cost analysis returned no FLOP count on this backend.")
    return float(cost["flops"])


def model_summary(cfg: ModelConfig) -> dict[str, Any]:
    """Sizes and per-image forward cost of `cfg`, for `mmdit info` and logs."""
    params = count_params(_abstract_model(cfg))
    flops = forward_flops(cfg, batch=1)
    return {
        "arch": cfg.arch,
        "params": params["total"],
        "trainable_params": params["trainable"],
        "fixed_params": params["fixed"],
        "tokens": cfg.num_patches,
        "gflops_per_image": flops / 1e9,
        "gmacs_per_image": flops / 2e9,
        "flops_convention": "XLA HLO cost analysis of one forward; 1 multiply-add = 2 FLOPs "
        "(the DiT paper's Gflops count multiply-adds: compare gmacs_per_image)",
    }
