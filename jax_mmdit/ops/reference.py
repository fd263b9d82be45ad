"""The operations in plain `jax.numpy`: the maths every backend must reproduce.

Conventions shared by all backends (`jax_mmdit.ops`):
- Tensor names carry their shape: `x_MxK` (rows by features), `x_BxLxD` (batch, tokens, width),
  `q_BxLxNxK` (batch, tokens, heads, head size).
- `dtype` is the compute dtype of matmul operands; parameters arrive in float32 and are cast here.
  Accumulation is float32. Norm statistics, modulation and softmax are float32.
- A dense layer returns its compute dtype here; a backend may return float32 instead (XLA:CPU), so
  callers cast where they need one or the other.
- Attention takes an optional key mask `mask_BxS` (True = attend): masked keys get no weight. Every
  query must have at least one key to attend to.

`ReferenceOps` wraps these functions as a backend; tests compare every other backend with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

Dtype = Any


def dense(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array, dtype: Dtype) -> jax.Array:
    """x @ w + b with operands in `dtype`, float32 accumulation, result in `dtype`."""
    dt = jnp.dtype(dtype)
    y = jnp.dot(x_MxK.astype(dt), w_KxN.astype(dt), preferred_element_type=jnp.float32)
    return (y + b_N.astype(jnp.float32)).astype(dt)


def gelu_tanh(z: jax.Array) -> jax.Array:
    """The tanh approximation of GELU (DiT and SD3's MLP)."""
    return jax.nn.gelu(z, approximate=True)


def dense_gelu(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array, dtype: Dtype) -> jax.Array:
    """GELU_tanh(x @ w + b), in `dtype`."""
    return gelu_tanh(dense(x_MxK, w_KxN, b_N, dtype))


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without affine parameters, in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


def ln_modulate(x_BxLxD: jax.Array, shift_BxD: jax.Array, scale_BxD: jax.Array, dtype: Dtype, eps: float) -> jax.Array:
    """adaLN: LayerNorm(x) * (1 + scale) + shift per sample, computed in float32, returned in `dtype`."""
    h = layer_norm(x_BxLxD, eps) * (1.0 + scale_BxD[:, None, :]) + shift_BxD[:, None, :]
    return h.astype(dtype)


def gated_residual(x_BxLxD: jax.Array, gate_BxD: jax.Array, a_BxLxD: jax.Array) -> jax.Array:
    """x + gate * a: adaLN-Zero's gated branch output `a` added to the float32 residual stream."""
    return x_BxLxD + gate_BxD[:, None, :] * a_BxLxD


def rms_norm(x: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis; float32 statistics, x's dtype out."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale_D).astype(x.dtype)


def key_bias(mask_BxS: jax.Array | None, batch: int, keys: int) -> jax.Array:
    """The additive logit bias of a key mask: 0 where True, -inf where False; zeros without a mask."""
    if mask_BxS is None:
        return jnp.zeros((batch, keys), jnp.float32)
    if mask_BxS.shape != (batch, keys):
        raise ValueError(f"attention mask must be (batch, keys) = {(batch, keys)}, got {mask_BxS.shape}.")
    return jnp.where(mask_BxS, 0.0, -jnp.inf).astype(jnp.float32)


def attention(
    q_BxLxNxK: jax.Array, k_BxSxNxK: jax.Array, v_BxSxNxK: jax.Array, mask_BxS: jax.Array | None = None
) -> jax.Array:
    """softmax(q k^T / sqrt(K) + mask) v -> (B, L, N*K) in v's dtype; logits and softmax float32."""
    B, L, N, K = q_BxLxNxK.shape
    logits_BxNxLxS = jnp.einsum("blnk,bsnk->bnls", q_BxLxNxK, k_BxSxNxK, preferred_element_type=jnp.float32)
    logits_BxNxLxS = logits_BxNxLxS * K**-0.5 + key_bias(mask_BxS, B, k_BxSxNxK.shape[1])[:, None, None, :]
    p_BxNxLxS = jax.nn.softmax(logits_BxNxLxS, axis=-1).astype(v_BxSxNxK.dtype)
    o_BxLxNxK = jnp.einsum("bnls,bsnk->blnk", p_BxNxLxS, v_BxSxNxK, preferred_element_type=jnp.float32)
    return o_BxLxNxK.astype(v_BxSxNxK.dtype).reshape(B, L, N * K)


def split_qkv(qkv_BxLx3xNxK: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v from a packed (B, L, 3, N, K) projection. A split, not indexing: the gradient of a
    split is one concatenate, while three index slices each become a zero-padded full-size array."""
    q, k, v = (a[:, :, 0] for a in jnp.split(qkv_BxLx3xNxK, 3, axis=2))
    return q, k, v


def xla_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled executable by XLA's cost analysis (a multiply-add is 2), or
    None where the backend does not implement it. Custom calls count as zero."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


@dataclass(frozen=True)
class ReferenceOps:
    """A backend: the operations the models use, one method each, plus two introspection hooks.
    This one calls the plain functions above; backends override what they compute differently and
    inherit the rest. Instances are small, frozen and hashable: models keep theirs as a static
    attribute (part of the graph definition, not of the state)."""

    name: ClassVar[str] = "reference"
    # How attention runs where a backend has a choice: "auto", "xla" or "cudnn" (TrainConfig.attention).
    attention_impl: str = "auto"

    def high_precision(self):
        """The backend for layers kept out of reduced-precision matmuls (embedders, the final
        layer): this one, except where a wrapper (`ops.fp8.Fp8Ops`) lowers the blocks' precision."""
        return self

    def dense(self, x_MxK, w_KxN, b_N, dtype):
        return dense(x_MxK, w_KxN, b_N, dtype)

    def dense_gelu(self, x_MxK, w_KxN, b_N, dtype):
        return gelu_tanh(self.dense(x_MxK, w_KxN, b_N, dtype))

    def ln_modulate(self, x_BxLxD, shift_BxD, scale_BxD, dtype, eps: float):
        return ln_modulate(x_BxLxD, shift_BxD, scale_BxD, dtype, eps)

    def gated_residual(self, x_BxLxD, gate_BxD, a_BxLxD):
        return gated_residual(x_BxLxD, gate_BxD, a_BxLxD)

    def rms_norm(self, x, scale_D, eps: float):
        return rms_norm(x, scale_D, eps)

    def attention(self, q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, mask_BxS=None):
        return attention(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, mask_BxS)

    def attention_packed(self, qkv_BxLx3xNxK, mask_BxL=None):
        """Self-attention of the q, k, v packed in one (B, L, 3, N, K) projection -> (B, L, N*K)."""
        return self.attention(*split_qkv(qkv_BxLx3xNxK), mask_BxL)

    def joint_attention(self, x_qkv, c_qkv, mask_BxT=None):
        """MMDiT's joint attention over the image tokens (q, k, v each (B, L, N, K)) followed by the
        context tokens ((B, T, N, K); `mask_BxT` marks the real ones) -> (o_x (B, L, N*K), o_c
        (B, T, N*K)). Image first, as diffusers orders them (attention is permutation-equivariant)."""
        B, L = x_qkv[0].shape[:2]
        qkv = [jnp.concatenate([a, b], axis=1) for a, b in zip(x_qkv, c_qkv)]
        mask = None if mask_BxT is None else jnp.concatenate([jnp.ones((B, L), bool), mask_BxT], axis=1)
        o_BxSxD = self.attention(*qkv, mask)
        return o_BxSxD[:, :L], o_BxSxD[:, L:]

    # ---- introspection ----------------------------------------------------------------------
    def flops(self, compiled) -> float | None:
        """FLOPs of one call of `compiled` (a jitted function's `.lower(...).compile()`), custom
        calls included: the hook FLOP/s, MFU and `mmdit info` read."""
        return xla_flops(compiled)

    def kernel_calls(self, compiled) -> frozenset[str]:
        """The backend's own kernels that `compiled` calls (empty: XLA's own ops ran)."""
        return frozenset()
