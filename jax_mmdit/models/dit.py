"""DiT (Peebles & Xie 2023): patch tokens + adaLN-Zero transformer blocks conditioned on
timestep + class embeddings. One timestep and one label embedder are shared by all blocks,
as in the paper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mmdit.models.attention import QKV
from jax_mmdit.models.config import ModelConfig
from jax_mmdit.models.layers import (
    NORM_EPS,
    Dense,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    Modulation,
    PatchEmbed,
    TimestepEmbedder,
    make_pos_embed,
    remat_call,
    unpatchify,
)
from jax_mmdit.ops import Ops


class DiTBlock(nnx.Module):
    """Pre-norm self-attention + MLP, each LayerNorm modulated and each branch gated by adaLN-Zero."""

    def __init__(self, cfg: ModelConfig, ops: Ops, rngs: nnx.Rngs):
        D, dtype = cfg.hidden_size, cfg.compute_dtype
        self.dtype, self.ops = dtype, ops
        self.modulation = Modulation(D, 6, dtype, ops, rngs)
        self.attn = QKV(D, cfg.num_heads, cfg.qk_norm, dtype, ops, rngs)
        self.attn_out = Dense(D, D, dtype, ops, rngs)
        self.mlp = Mlp(D, cfg.mlp_ratio, cfg.mlp, dtype, ops, rngs)

    def __call__(self, x_BxLxD: jax.Array, c_BxD: jax.Array) -> jax.Array:
        B, L, D = x_BxLxD.shape
        ops = self.ops
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c_BxD)

        h_NxD = ops.ln_modulate(x_BxLxD, shift_a, scale_a, self.dtype, NORM_EPS).reshape(B * L, D)
        o_BxLxD = self.attn.self_attention(h_NxD, B)
        a_NxD = self.attn_out(o_BxLxD.reshape(B * L, D))
        x_BxLxD = ops.gated_residual(x_BxLxD, gate_a, a_NxD.reshape(B, L, D))

        h_NxD = ops.ln_modulate(x_BxLxD, shift_m, scale_m, self.dtype, NORM_EPS).reshape(B * L, D)
        m_NxD = self.mlp(h_NxD)
        return ops.gated_residual(x_BxLxD, gate_m, m_NxD.reshape(B, L, D))


def check_inputs(cfg: ModelConfig, x_BxHxWxC: jax.Array, t_B: jax.Array) -> None:
    """Shape checks at trace time, so a wrong layout fails with a sentence, not an XLA error."""
    want = (cfg.image_size, cfg.image_size, cfg.in_channels)
    if jnp.ndim(x_BxHxWxC) != 4 or tuple(jnp.shape(x_BxHxWxC)[1:]) != want:
        raise ValueError(f"Expected x of shape (B, {want[0]}, {want[1]}, {want[2]}) (NHWC), got {x_BxHxWxC.shape}.")
    if jnp.shape(t_B) != (x_BxHxWxC.shape[0],):
        raise ValueError(f"Expected t of shape ({x_BxHxWxC.shape[0]},) with values in [0, 1], got {t_B.shape}.")


def check_labels(cfg: ModelConfig, y_B: jax.Array | None, batch: int) -> None:
    if cfg.num_classes > 0:
        if y_B is None:
            raise ValueError(f"This model is class-conditional; pass y (int, null class = {cfg.num_classes}).")
        if jnp.shape(y_B) != (batch,):
            raise ValueError(f"Expected y of shape ({batch},), got {y_B.shape}.")


def interval_embedding(h_embedder: TimestepEmbedder | None, h_B: jax.Array | None, t_B: jax.Array):
    """The MeanFlow interval's embedding (0 for a one-time network; h None means h = 0)."""
    if h_embedder is None:
        if h_B is not None:
            raise ValueError("This model has no interval input (model.interval_embed is off); do not pass h_B.")
        return 0.0
    if h_B is not None and jnp.shape(h_B) != jnp.shape(t_B):
        raise ValueError(f"Expected h of shape {jnp.shape(t_B)} like t, got {jnp.shape(h_B)}.")
    return h_embedder(jnp.zeros_like(t_B) if h_B is None else h_B)


class DiT(nnx.Module):
    """The network; `ops` is the backend its layers compute with (`jax_mmdit.ops.resolve`)."""

    def __init__(self, cfg: ModelConfig, ops: Ops, rngs: nnx.Rngs):
        if cfg.arch != "dit":
            raise ValueError(f"DiT needs cfg.arch == 'dit', got {cfg.arch!r}.")
        self.cfg = cfg
        D, dtype = cfg.hidden_size, cfg.compute_dtype
        outer = ops.high_precision()  # embedders and the final layer: never fp8
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.patch_size, D, cfg.stem, dtype, outer, rngs)
        self.pos_embed = make_pos_embed(
            cfg.pos_embed, cfg.grid_size, D, rngs, cfg.pos_embed_offset, cfg.pos_embed_scale
        )
        self.t_embedder = TimestepEmbedder(D, dtype, outer, rngs, cfg.time_scale)
        self.h_embedder = TimestepEmbedder(D, dtype, outer, rngs, cfg.time_scale) if cfg.interval_embed else None
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, rngs) if cfg.num_classes > 0 else None
        self.blocks = nnx.List([DiTBlock(cfg, ops, rngs) for _ in range(cfg.depth)])
        self.final = FinalLayer(D, cfg.patch_size, cfg.out_channels, dtype, outer, rngs)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def __call__(
        self, x_BxHxWxC: jax.Array, t_B: jax.Array, y_B: jax.Array | None = None, h_B: jax.Array | None = None
    ) -> jax.Array:
        """Velocity (or 2C channels with learn_sigma) for noisy x at time t in [0, 1], float32.
        y is ignored by an unconditional model (num_classes == 0). With interval_embed, the average
        velocity over [t - h_B, t] (h_B None: 0, the instantaneous velocity)."""
        cfg = self.cfg
        check_inputs(cfg, x_BxHxWxC, t_B)
        check_labels(cfg, y_B, x_BxHxWxC.shape[0])

        x_BxLxD = self.patch_embed(x_BxHxWxC) + self.pos_embed[...][None]
        c_BxD = self.t_embedder(t_B) + interval_embedding(self.h_embedder, h_B, t_B)
        if self.y_embedder is not None:
            c_BxD = c_BxD + self.y_embedder(y_B)

        for block in self.blocks:
            if cfg.remat:
                x_BxLxD = remat_call(block, x_BxLxD, c_BxD)
            else:
                x_BxLxD = block(x_BxLxD, c_BxD)

        out_BxLxK = self.final(x_BxLxD, c_BxD)
        return unpatchify(out_BxLxK, cfg.patch_size, cfg.out_channels).astype(jnp.float32)
