"""`create_model`: the network a config names, on the backend it should compute with."""

from __future__ import annotations

from flax import nnx

from jax_mmdit.models.config import ModelConfig
from jax_mmdit.models.dit import DiT
from jax_mmdit.models.mmdit import MMDiT
from jax_mmdit.ops import Ops, resolve


def create_model(cfg: ModelConfig, rngs: nnx.Rngs, ops: Ops | None = None) -> DiT | MMDiT:
    """Build the network `cfg.arch` names; parameters are float32. `ops` is the backend its layers
    call (`jax_mmdit.ops.resolve`); None resolves kernels="auto" for all of jax's devices, with the
    config's attention implementation."""
    ops = resolve("auto") if ops is None else ops
    return DiT(cfg, ops, rngs) if cfg.arch == "dit" else MMDiT(cfg, ops, rngs)
