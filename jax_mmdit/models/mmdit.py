"""MMDiT (Esser et al. 2024, Stable Diffusion 3): image tokens and context tokens keep separate
weights (adaLN modulation, QKV, output projection, MLP) but attend jointly over the concatenation.
The conditioning vector c = timestep embedding + pooled-condition embedding drives every adaLN.

Context comes from one of two sources:
- text (`context_dim > 0`): precomputed token embeddings projected by a Linear, plus an optional
  pooled embedding (`pooled_dim > 0`) through an MLP; exactly the SD3 layout (see convert.py);
- classes (`context_dim == 0`): `num_context_tokens` learned tokens per class and a label
  embedding as the pooled condition, both with a null row for CFG, so MMDiT trains on the same
  class-labelled data as DiT. An unconditional model (num_classes == 0) always uses the null row.

The last block's context stream is "pre-only" (SD3): it only supplies keys/values, since its
output would be discarded.

Blocks in `cfg.dual_attention_layers` are SD3.5's dual-attention blocks (diffusers'
`JointTransformerBlock(use_dual_attention=True)`): the image stream's adaLN emits 9 chunks, the
last three (shift, scale, gate) modulating the same LayerNorm of the block input for a second,
image-only self-attention (its own QKV, QK-norm and output projection), added after the joint
attention's residual and before the MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mmdit.models.attention import QKV
from jax_mmdit.models.config import ModelConfig
from jax_mmdit.models.dit import check_inputs, check_labels, interval_embedding
from jax_mmdit.models.layers import (
    NORM_EPS,
    Dense,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    MlpEmbedder,
    Modulation,
    PatchEmbed,
    TimestepEmbedder,
    make_pos_embed,
    remat_call,
    unpatchify,
)
from jax_mmdit.ops import Ops


class MMDiTBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, pre_only: bool, ops: Ops, rngs: nnx.Rngs, dual: bool = False):
        D, dtype = cfg.hidden_size, cfg.compute_dtype
        self.dtype, self.ops, self.pre_only = dtype, ops, pre_only
        # image stream; a dual block's modulation adds (shift, scale, gate) of its second attention
        self.x_modulation = Modulation(D, 9 if dual else 6, dtype, ops, rngs)
        self.x_attn = QKV(D, cfg.num_heads, cfg.qk_norm, dtype, ops, rngs)
        self.x_attn_out = Dense(D, D, dtype, ops, rngs)
        self.x_mlp = Mlp(D, cfg.mlp_ratio, cfg.mlp, dtype, ops, rngs)
        # SD3.5 dual attention: a second, image-only self-attention of the image stream.
        self.x_attn2 = QKV(D, cfg.num_heads, cfg.qk_norm, dtype, ops, rngs) if dual else None
        self.x_attn2_out = Dense(D, D, dtype, ops, rngs) if dual else None
        # context stream; pre-only needs just (shift, scale) for the pre-attention norm
        self.c_modulation = Modulation(D, 2 if pre_only else 6, dtype, ops, rngs)
        self.c_attn = QKV(D, cfg.num_heads, cfg.qk_norm, dtype, ops, rngs)
        self.c_attn_out = None if pre_only else Dense(D, D, dtype, ops, rngs)
        self.c_mlp = None if pre_only else Mlp(D, cfg.mlp_ratio, cfg.mlp, dtype, ops, rngs)

    def __call__(
        self, x_BxLxD: jax.Array, ctx_BxTxD: jax.Array, c_BxD: jax.Array, mask_BxT: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        B, L, D = x_BxLxD.shape
        T = ctx_BxTxD.shape[1]
        ops = self.ops
        x_mods = self.x_modulation(c_BxD)
        x_shift_a, x_scale_a, x_gate_a, x_shift_m, x_scale_m, x_gate_m = x_mods[:6]
        if self.pre_only:
            c_shift_a, c_scale_a = self.c_modulation(c_BxD)
        else:
            c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = self.c_modulation(c_BxD)

        hx_NxD = ops.ln_modulate(x_BxLxD, x_shift_a, x_scale_a, self.dtype, NORM_EPS).reshape(B * L, D)
        hc_MxD = ops.ln_modulate(ctx_BxTxD, c_shift_a, c_scale_a, self.dtype, NORM_EPS).reshape(B * T, D)
        if self.x_attn2 is not None:
            # SD35AdaLayerNormZeroX: the second attention's input is the block input's LayerNorm too.
            x_shift_a2, x_scale_a2, x_gate_a2 = x_mods[6:]
            hx2_NxD = ops.ln_modulate(x_BxLxD, x_shift_a2, x_scale_a2, self.dtype, NORM_EPS).reshape(B * L, D)
        ox_BxLxD, oc_BxTxD = ops.joint_attention(self.x_attn(hx_NxD, B), self.c_attn(hc_MxD, B), mask_BxT)

        ax_NxD = self.x_attn_out(ox_BxLxD.reshape(B * L, D))
        x_BxLxD = ops.gated_residual(x_BxLxD, x_gate_a, ax_NxD.reshape(B, L, D))
        if self.x_attn2 is not None:
            o2_BxLxD = self.x_attn2.self_attention(hx2_NxD, B)
            a2_NxD = self.x_attn2_out(o2_BxLxD.reshape(B * L, D))
            x_BxLxD = ops.gated_residual(x_BxLxD, x_gate_a2, a2_NxD.reshape(B, L, D))
        hx_NxD = ops.ln_modulate(x_BxLxD, x_shift_m, x_scale_m, self.dtype, NORM_EPS).reshape(B * L, D)
        x_BxLxD = ops.gated_residual(x_BxLxD, x_gate_m, self.x_mlp(hx_NxD).reshape(B, L, D))
        if self.pre_only:
            return x_BxLxD, None

        ac_MxD = self.c_attn_out(oc_BxTxD.reshape(B * T, D))
        ctx_BxTxD = ops.gated_residual(ctx_BxTxD, c_gate_a, ac_MxD.reshape(B, T, D))
        hc_MxD = ops.ln_modulate(ctx_BxTxD, c_shift_m, c_scale_m, self.dtype, NORM_EPS).reshape(B * T, D)
        ctx_BxTxD = ops.gated_residual(ctx_BxTxD, c_gate_m, self.c_mlp(hc_MxD).reshape(B, T, D))
        return x_BxLxD, ctx_BxTxD


class MMDiT(nnx.Module):
    """The network; `ops` is the backend its layers compute with (`jax_mmdit.ops.resolve`)."""

    def __init__(self, cfg: ModelConfig, ops: Ops, rngs: nnx.Rngs):
        if cfg.arch != "mmdit":
            raise ValueError(f"MMDiT needs cfg.arch == 'mmdit', got {cfg.arch!r}.")
        self.cfg = cfg
        D, dtype = cfg.hidden_size, cfg.compute_dtype
        outer = ops.high_precision()  # embedders and the final layer: never fp8
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.patch_size, D, cfg.stem, dtype, outer, rngs)
        self.pos_embed = make_pos_embed(
            cfg.pos_embed, cfg.grid_size, D, rngs, cfg.pos_embed_offset, cfg.pos_embed_scale
        )
        self.t_embedder = TimestepEmbedder(D, dtype, outer, rngs, cfg.time_scale)
        self.h_embedder = TimestepEmbedder(D, dtype, outer, rngs, cfg.time_scale) if cfg.interval_embed else None
        if cfg.uses_class_tokens:
            self.class_tokens = LabelEmbedder(cfg.num_classes, cfg.num_context_tokens * D, rngs)
            self.pooled_embedder = LabelEmbedder(cfg.num_classes, D, rngs)
            self.context_embedder = None
        else:
            self.class_tokens = None
            self.context_embedder = Dense(cfg.context_dim, D, dtype, outer, rngs)
            self.pooled_embedder = MlpEmbedder(cfg.pooled_dim, D, dtype, outer, rngs) if cfg.pooled_dim > 0 else None
        self.blocks = nnx.List(
            [
                MMDiTBlock(cfg, i == cfg.depth - 1, ops, rngs, dual=i in cfg.dual_attention_layers)
                for i in range(cfg.depth)
            ]
        )
        self.final = FinalLayer(D, cfg.patch_size, cfg.out_channels, dtype, outer, rngs)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def _condition(
        self, y_B: jax.Array | None, context_BxTxE: jax.Array | None, pooled_BxP: jax.Array | None, batch: int
    ) -> tuple[jax.Array, jax.Array | None]:
        """-> (context tokens (B, T, D) float32, pooled embedding (B, D) or None)."""
        cfg, D = self.cfg, self.cfg.hidden_size
        if cfg.uses_class_tokens:
            if context_BxTxE is not None or pooled_BxP is not None:
                raise ValueError("This MMDiT uses learned class tokens (context_dim=0); pass y, not context/pooled.")
            check_labels(cfg, y_B, batch)
            if cfg.num_classes == 0:
                y_B = jnp.full((batch,), cfg.null_class, jnp.int32)
            ctx = self.class_tokens(y_B).reshape(batch, cfg.num_context_tokens, D)
            return ctx, self.pooled_embedder(y_B)

        if y_B is not None:
            raise ValueError("This MMDiT is text-conditioned (context_dim>0); pass context/pooled, not y.")
        if context_BxTxE is None or context_BxTxE.ndim != 3 or context_BxTxE.shape[0] != batch:
            got = None if context_BxTxE is None else context_BxTxE.shape
            raise ValueError(f"Expected context of shape ({batch}, T, {cfg.context_dim}), got {got}.")
        if context_BxTxE.shape[2] != cfg.context_dim:
            raise ValueError(f"Expected context width {cfg.context_dim}, got {context_BxTxE.shape[2]}.")
        B, T, E = context_BxTxE.shape
        ctx = self.context_embedder(context_BxTxE.reshape(B * T, E)).astype(jnp.float32).reshape(B, T, D)
        if self.pooled_embedder is None:
            if pooled_BxP is not None:
                raise ValueError("This MMDiT has pooled_dim=0; do not pass pooled.")
            return ctx, None
        if pooled_BxP is None or pooled_BxP.shape != (batch, cfg.pooled_dim):
            got = None if pooled_BxP is None else pooled_BxP.shape
            raise ValueError(f"Expected pooled of shape ({batch}, {cfg.pooled_dim}), got {got}.")
        return ctx, self.pooled_embedder(pooled_BxP)

    def __call__(
        self,
        x_BxHxWxC: jax.Array,
        t_B: jax.Array,
        y_B: jax.Array | None = None,
        context_BxTxE: jax.Array | None = None,
        pooled_BxP: jax.Array | None = None,
        context_mask_BxT: jax.Array | None = None,
        h_B: jax.Array | None = None,
    ) -> jax.Array:
        """Velocity for noisy x at time t in [0, 1], float32 (2C channels with learn_sigma); with
        interval_embed, the average velocity over [t - h_B, t] (as DiT).
        `context_mask_BxT` (bool, text only) marks real tokens: padding neither gives attention to
        the image tokens nor, through them, changes the output (ignored with cfg.context_mask off)."""
        cfg = self.cfg
        check_inputs(cfg, x_BxHxWxC, t_B)
        B = x_BxHxWxC.shape[0]
        ctx_BxTxD, pooled_BxD = self._condition(y_B, context_BxTxE, pooled_BxP, B)
        mask = context_mask_BxT if cfg.context_mask else None
        if mask is not None:
            if cfg.uses_class_tokens or mask.shape != ctx_BxTxD.shape[:2]:
                raise ValueError(
                    f"context_mask must be (B, T) = {ctx_BxTxD.shape[:2]} for text context, got {mask.shape}."
                )
            mask = mask.astype(bool)

        x_BxLxD = self.patch_embed(x_BxHxWxC) + self.pos_embed[...][None]
        c_BxD = self.t_embedder(t_B) + interval_embedding(self.h_embedder, h_B, t_B)
        if pooled_BxD is not None:
            c_BxD = c_BxD + pooled_BxD

        for block in self.blocks:
            if cfg.remat:
                x_BxLxD, ctx_BxTxD = remat_call(block, x_BxLxD, ctx_BxTxD, c_BxD, mask)
            else:
                x_BxLxD, ctx_BxTxD = block(x_BxLxD, ctx_BxTxD, c_BxD, mask)

        out_BxLxK = self.final(x_BxLxD, c_BxD)
        return unpatchify(out_BxLxK, cfg.patch_size, cfg.out_channels).astype(jnp.float32)
