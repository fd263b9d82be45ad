"""The q/k/v projection of a token stream and its attention (`ops.attention*`). Layout conventions
are `layers`'."""

from __future__ import annotations

import jax
from flax import nnx

from jax_mmdit.models.layers import Dense, RMSNorm
from jax_mmdit.ops import Ops
from jax_mmdit.ops.reference import Dtype, split_qkv


class QKV(nnx.Module):
    """Fused q/k/v projection of one token stream (one matmul), optional per-head RMS QK-norm.
    Kernel columns are [q | k | v], each (heads, head_dim): the layout of DiT/timm's qkv Linear."""

    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, dtype: Dtype, ops: Ops, rngs: nnx.Rngs):
        self.num_heads, self.dtype, self.ops = num_heads, dtype, ops
        self.qkv = Dense(hidden, 3 * hidden, dtype, ops, rngs)
        head_dim = hidden // num_heads
        self.q_norm = RMSNorm(head_dim, ops) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, ops) if qk_norm else None

    def packed(self, h_MxD: jax.Array, batch: int) -> jax.Array:
        """The projection as one (B, L, 3, N, K) array in the compute dtype."""
        M, D = h_MxD.shape
        N = self.num_heads
        return self.qkv(h_MxD).astype(self.dtype).reshape(batch, M // batch, 3, N, D // N)

    def __call__(self, h_MxD: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q, k, v, each (B, L, N, K), QK-normalised if configured."""
        q_BxLxNxK, k_BxLxNxK, v_BxLxNxK = split_qkv(self.packed(h_MxD, batch))
        if self.q_norm is not None:
            q_BxLxNxK, k_BxLxNxK = self.q_norm(q_BxLxNxK), self.k_norm(k_BxLxNxK)
        return q_BxLxNxK, k_BxLxNxK, v_BxLxNxK

    def self_attention(self, h_MxD: jax.Array, batch: int) -> jax.Array:
        """Attention of the stream's tokens over themselves -> (B, L, D). Without QK-norm, q, k and v
        go to attention packed as the projection wrote them."""
        if self.q_norm is None:
            return self.ops.attention_packed(self.packed(h_MxD, batch))
        return self.ops.attention(*self(h_MxD, batch))
