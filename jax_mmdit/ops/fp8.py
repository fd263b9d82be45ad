"""fp8 matmuls for the transformer blocks (`--precision fp8`): a backend wrapper.

Each dense layer of a block computes x @ w with both operands in float8_e4m3fn and the gradient
of its output in float8_e5m2 (the wider range gradients need), accumulating in float32, as
Transformer Engine's fp8 recipe and flax's fp8 dot do. Scaling is per tensor and *current*: each
operand is scaled by fmax / amax(operand) of this very call before the cast, so nothing is
carried between steps (no amax history to checkpoint, and a resumed run computes exactly what an
uninterrupted one does). Master weights stay float32 (the optimizer's), everything outside the
blocks' matmuls runs as bf16 does. On GPUs with fp8 tensor cores (Hopper, Ada) XLA runs these
dots in fp8; on CPU XLA emulates them, so the numerics are the same and the speed is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
E5M2_MAX = float(jnp.finfo(E5M2).max)  # 57344


def quantize(x: jax.Array, dtype, fmax: float) -> tuple[jax.Array, jax.Array]:
    """(x scaled into dtype's range and cast, the float32 factor that undoes the scaling)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32))
    scale = jnp.where(amax > 0, fmax / amax, 1.0)
    # Clipped before the cast: e4m3fn has no inf, an out-of-range value would become NaN.
    return jnp.clip(x32 * scale, -fmax, fmax).astype(dtype), 1.0 / scale


def _dot(a, b, contract):
    return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


@jax.custom_vjp
def fp8_matmul(x_MxK: jax.Array, w_KxN: jax.Array) -> jax.Array:
    """x @ w in fp8 (e4m3 operands, float32 result)."""
    return _fp8_fwd(x_MxK, w_KxN)[0]


def _fp8_fwd(x_MxK, w_KxN):
    xq, xs = quantize(x_MxK, E4M3, E4M3_MAX)
    wq, ws = quantize(w_KxN, E4M3, E4M3_MAX)
    y = _dot(xq, wq, ((1,), (0,))) * (xs * ws)
    # The zero-size arrays carry the operands' dtypes to the backward pass.
    return y, (xq, xs, wq, ws, jnp.zeros((0,), x_MxK.dtype), jnp.zeros((0,), w_KxN.dtype))


def _fp8_bwd(res, g_MxN):
    xq, xs, wq, ws, x_tag, w_tag = res
    gq, gs = quantize(g_MxN, E5M2, E5M2_MAX)
    dx = _dot(gq, wq, ((1,), (1,))) * (gs * ws)  # g @ w.T
    dw = _dot(xq, gq, ((0,), (0,))) * (xs * gs)  # x.T @ g
    return dx.astype(x_tag.dtype), dw.astype(w_tag.dtype)


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


@dataclass(frozen=True)
class Fp8Ops:
    """`base`'s operations with the dense layers in fp8 (module docstring). Layers that should
    stay in higher precision (embedders, the final layer) use `high_precision()`: `base` itself."""

    base: Any  # an Ops backend
    name: ClassVar[str] = "fp8"

    def __getattr__(self, attr: str):  # everything but the dense layers is base's
        if attr == "base":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(attr)
        return getattr(self.base, attr)

    @property
    def attention_impl(self) -> str:
        return self.base.attention_impl

    def high_precision(self):
        return self.base

    def dense(self, x_MxK, w_KxN, b_N, dtype):
        y = fp8_matmul(x_MxK.astype(dtype), w_KxN)
        return (y + b_N.astype(jnp.float32)).astype(dtype)

    def dense_gelu(self, x_MxK, w_KxN, b_N, dtype):
        return jax.nn.gelu(self.dense(x_MxK, w_KxN, b_N, dtype), approximate=True)
