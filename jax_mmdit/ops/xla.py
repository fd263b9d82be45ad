"""XLA backends: `XlaOps` for GPUs and TPUs, `XlaCpuOps` with XLA:CPU's layout workarounds.

Both compute the reference maths (`ops.reference`) with XLA's own ops. On accelerators that is
the reference itself, except attention, which goes through `jax.nn.dot_product_attention` (cuDNN
flash attention on GPUs for bf16/fp16). On CPU, three things are written so that XLA:CPU runs them
fast (the measurements are in docs/performance.md):
- dense layers return float32: XLA:CPU computes bf16 elementwise ops in fp32 anyway but splits a
  bf16 chain (bias + GELU + cast) into one pass per op;
- bf16 matmuls have a hand-written backward whose every dot is bf16 x bf16 -> f32 in a layout
  XLA:CPU hands to its native bf16 kernel (a transposed-operand dot is upcast to fp32);
- attention is heads-major batched matmuls with a hand-written backward that keeps only the
  compute-dtype probabilities (autodiff kept float32 exp(logits) too).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jax_mmdit.ops import reference
from jax_mmdit.ops.reference import ReferenceOps

_HALF = (jnp.bfloat16, jnp.float16)


@dataclass(frozen=True)
class XlaOps(ReferenceOps):
    """GPUs and TPUs. Attention: `jax.nn.dot_product_attention`; on a GPU with bf16/fp16 operands
    "auto" asks for cuDNN flash attention and falls back to XLA's kernel where this cuDNN or shape
    is not supported (jax checks that while tracing); "cudnn" insists."""

    name: ClassVar[str] = "xla"
    platform: str = "gpu"

    def attention(self, q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, mask_BxS=None):
        B, L, N, K = q_BxLxNxK.shape
        mask = None if mask_BxS is None else mask_BxS[:, None, None, :]
        call = functools.partial(jax.nn.dot_product_attention, q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, mask=mask)
        if self.attention_impl == "cudnn":
            return call(implementation="cudnn").reshape(B, L, N * K)
        if self.attention_impl == "auto" and self.platform == "gpu" and q_BxLxNxK.dtype in _HALF:
            try:  # jax's implementation=None never picks cuDNN (0.10)
                return call(implementation="cudnn").reshape(B, L, N * K)
            except (NotImplementedError, ValueError, RuntimeError):
                pass
        return call(implementation=None).reshape(B, L, N * K)


# ---- XLA:CPU -------------------------------------------------------------------------------------
# Tile height of `materialised_transpose`: rows per tile, divided down to fit any M.
_TRANSPOSE_TILE = 64


def materialised_transpose(x_xMxK: jax.Array) -> jax.Array:
    """Swaps the last two axes, (..., M, K) -> (..., K, M), written as a transpose of (M/T, T, K)
    tiles, which XLA cannot fold into the consuming dot. A plain transpose is folded into a
    transposed-operand ("TN") dot, a layout XLA:CPU's bf16 matmul kernel does not take, so XLA
    upcasts both operands and runs an fp32 dot instead, several times slower than the copy."""
    *lead, M, K = x_xMxK.shape
    t = math.gcd(M, _TRANSPOSE_TILE)
    n = len(lead)
    tiles = x_xMxK.reshape(*lead, M // t, t, K)
    return tiles.transpose(*range(n), n + 2, n, n + 1).reshape(*lead, K, M)


@jax.custom_vjp
def bf16_matmul(x_MxK: jax.Array, w_KxN: jax.Array) -> jax.Array:
    """bf16 x @ (float32 w cast to bf16) -> float32, every matmul of forward and backward written as
    bf16 x bf16 -> f32 in a layout XLA:CPU's native bf16 kernel takes. Autodiff of a plain dot gives
    f32 cotangents and transposed layouts, which XLA:CPU upcasts to fp32 dots."""
    return jnp.einsum("mk,kn->mn", x_MxK, w_KxN.astype(x_MxK.dtype), preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(x_MxK, w_KxN):
    return bf16_matmul(x_MxK, w_KxN), (x_MxK, w_KxN.astype(x_MxK.dtype))


def _bf16_matmul_bwd(res, g_MxN):
    x_MxK, w_KxN = res
    g_MxN = g_MxN.astype(x_MxK.dtype)
    # dx contracts both operands' last axes ("NT"), which the bf16 kernel takes as is.
    dx_MxK = jnp.einsum("mn,kn->mk", g_MxN, w_KxN, preferred_element_type=jnp.float32)
    # The weight gradient stays float32: it goes straight into the fp32 master weights.
    dw_KxN = jnp.einsum("km,mn->kn", materialised_transpose(x_MxK), g_MxN, preferred_element_type=jnp.float32)
    return dx_MxK.astype(x_MxK.dtype), dw_KxN


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def xla_batched_dot(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool) -> jax.Array:
    """op(a) @ op(b) over leading batch axes -> float32; a transposed `a` is materialised first
    (XLA:CPU upcasts the folded "TN" layout to fp32)."""
    if transpose_a:
        a = materialised_transpose(a)
    spec = "...mk,...nk->...mn" if transpose_b else "...mk,...kn->...mn"
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


BatchedDot = Callable[[jax.Array, jax.Array, bool, bool], jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_attention(q_BxNxLxK, k_BxNxSxK, v_BxNxSxK, bias_BxS, dot: BatchedDot) -> jax.Array:
    """softmax(q k^T / sqrt(K) + bias) v -> (B, N, L, K) in v's dtype, heads-major, with `dot` for
    its six batched matmuls; logits and softmax in float32; `bias_BxS` (a key mask's, or None) gets
    no gradient. The hand-written backward (the standard
    one) keeps only the compute-dtype probabilities: autodiff of the forward also kept the float32
    exp(logits) and left two gradient matmuls in the layout XLA:CPU upcasts."""
    return _softmax_attention_fwd(q_BxNxLxK, k_BxNxSxK, v_BxNxSxK, bias_BxS, dot)[0]


def _softmax_attention_fwd(q_BxNxLxK, k_BxNxSxK, v_BxNxSxK, bias_BxS, dot):
    # Scaling q rather than the logits: XLA:CPU materialised the broadcast scale at logits size.
    q_BxNxLxK = q_BxNxLxK * jnp.asarray(q_BxNxLxK.shape[-1] ** -0.5, q_BxNxLxK.dtype)
    logits_BxNxLxS = dot(q_BxNxLxK, k_BxNxSxK, False, True)
    if bias_BxS is not None:
        logits_BxNxLxS = logits_BxNxLxS + bias_BxS[:, None, None, :]
    # Max-subtraction only guards exp against overflow; softmax is invariant to it.
    e_BxNxLxS = jnp.exp(logits_BxNxLxS - jnp.max(logits_BxNxLxS, axis=-1, keepdims=True))
    p_BxNxLxS = (e_BxNxLxS / jnp.sum(e_BxNxLxS, axis=-1, keepdims=True)).astype(v_BxNxSxK.dtype)
    o_BxNxLxK = dot(p_BxNxLxS, v_BxNxSxK, False, False).astype(v_BxNxSxK.dtype)
    return o_BxNxLxK, (q_BxNxLxK, k_BxNxSxK, v_BxNxSxK, bias_BxS, p_BxNxLxS, o_BxNxLxK)


def _softmax_attention_bwd(dot, res, do_BxNxLxK):
    q_BxNxLxK, k_BxNxSxK, v_BxNxSxK, bias_BxS, p_BxNxLxS, o_BxNxLxK = res  # q already scaled
    f32 = jnp.float32
    do_BxNxLxK = do_BxNxLxK.astype(v_BxNxSxK.dtype)
    dv_BxNxSxK = dot(p_BxNxLxS, do_BxNxLxK, True, False)
    dp_BxNxLxS = dot(do_BxNxLxK, v_BxNxSxK, False, True)
    # Softmax backward: dlogits = p * (dp - sum_s p * dp), and sum_s p * dp = sum_k do * o.
    delta_BxNxLx1 = jnp.sum(do_BxNxLxK.astype(f32) * o_BxNxLxK.astype(f32), axis=-1, keepdims=True)
    ds_BxNxLxS = (p_BxNxLxS.astype(f32) * (dp_BxNxLxS - delta_BxNxLx1)).astype(q_BxNxLxK.dtype)
    scale = q_BxNxLxK.shape[-1] ** -0.5
    dq_BxNxLxK = dot(ds_BxNxLxS, k_BxNxSxK, False, False) * scale
    dk_BxNxSxK = dot(ds_BxNxLxS, q_BxNxLxK, True, False)
    return (
        dq_BxNxLxK.astype(q_BxNxLxK.dtype),
        dk_BxNxSxK.astype(k_BxNxSxK.dtype),
        dv_BxNxSxK.astype(v_BxNxSxK.dtype),
        None if bias_BxS is None else jnp.zeros_like(bias_BxS),
    )


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def heads_major_attention(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, mask_BxS, dot: BatchedDot) -> jax.Array:
    """`softmax_attention` on (B, L, N, K) operands -> (B, L, N*K)."""
    B, L, N, K = q_BxLxNxK.shape
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q_BxLxNxK, k_BxSxNxK, v_BxSxNxK))
    bias_BxS = None if mask_BxS is None else reference.key_bias(mask_BxS, B, k_BxSxNxK.shape[1])
    return softmax_attention(q, k, v, bias_BxS, dot).transpose(0, 2, 1, 3).reshape(B, L, N * K)


@dataclass(frozen=True)
class XlaCpuOps(ReferenceOps):
    """XLA:CPU: the reference maths written in the forms XLA:CPU runs fast (module docstring).
    Dense layers return float32; attention ("auto" and "xla" alike) is `softmax_attention`."""

    name: ClassVar[str] = "xla"

    def dense(self, x_MxK, w_KxN, b_N, dtype):
        dt = jnp.dtype(dtype)
        if dt == jnp.float32:
            y = jnp.dot(x_MxK.astype(jnp.float32), w_KxN)
        elif dt == jnp.bfloat16:
            y = bf16_matmul(x_MxK.astype(dt), w_KxN)
        else:  # fp16 results: the one fp16 dot XLA:CPU supports under every matmul precision
            y = jnp.dot(x_MxK.astype(dt), w_KxN.astype(dt), preferred_element_type=dt).astype(jnp.float32)
        return y + b_N

    def attention(self, q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, mask_BxS=None):
        return heads_major_attention(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, mask_BxS, xla_batched_dot)
