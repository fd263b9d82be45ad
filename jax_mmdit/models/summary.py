"""Parameter counts and forward FLOPs of a config, without materialising any weights.

FLOP convention: the backend's `flops` hook on one compiled forward pass: XLA's cost analysis,
which counts a multiply-add as 2 FLOPs (plus elementwise ops, softmax, norms), and the backend's
own kernels, which XLA counts as zero. The DiT paper's "Gflops" (e.g. 118.6 for DiT-XL/2 at
32x32x4) count a multiply-add once, so compare `gmacs_per_image` (= FLOPs / 2) with the paper; it
is within a few percent because matmuls dominate.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_mmdit.models.config import ModelConfig
from jax_mmdit.models.factory import create_model
from jax_mmdit.models.layers import FixedEmbedding
from jax_mmdit.ops import Ops, resolve


def _size(state) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def count_params(model: nnx.Module) -> dict[str, int]:
    """{"total", "trainable", "fixed"} of a model (concrete or abstract): total counts the fixed
    sin-cos table, as DiT's paper does."""
    trainable = _size(nnx.state(model, nnx.Param))
    fixed = _size(nnx.state(model, FixedEmbedding))
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


def forward_flops(cfg: ModelConfig, ops: Ops, batch: int = 1) -> float:
    """FLOPs of one forward pass over `batch` images on backend `ops` (compiled, never run)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0), ops)))

    def forward(state: nnx.State, inputs: dict[str, jax.Array]) -> jax.Array:
        return nnx.merge(graphdef, state)(**inputs)

    flops = ops.flops(jax.jit(forward).lower(state, _example_inputs(cfg, batch)).compile())
    if flops is None:
        raise RuntimeError("XLA cost analysis returned no FLOP count on this backend.")
    return flops


def model_summary(cfg: ModelConfig, ops: Ops | None = None) -> dict[str, Any]:
    """Sizes and per-image forward cost of `cfg` on backend `ops` (None: kernels="auto"), for
    `mmdit info` and logs."""
    ops = resolve("auto") if ops is None else ops
    params = count_params(nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0), ops)))
    flops = forward_flops(cfg, ops, batch=1)
    return {
        "arch": cfg.arch,
        "params": params["total"],
        "trainable_params": params["trainable"],
        "fixed_params": params["fixed"],
        "tokens": cfg.num_patches,
        "gflops_per_image": flops / 1e9,
        "gmacs_per_image": flops / 2e9,
        "backend": ops.name,
        "flops_convention": "XLA's cost analysis of one compiled forward plus the backend's kernels; 1 multiply-add "
        "= 2 FLOPs (the DiT paper's Gflops count multiply-adds: compare gmacs_per_image)",
    }
