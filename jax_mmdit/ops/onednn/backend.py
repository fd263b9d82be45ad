"""`OnednnOps`: the operations on the C++/oneDNN kernels (CPU), each a `jax.custom_vjp` whose
forward and backward are kernel calls (`calls`), plus their FLOP accounting.

What runs where: dense layers (float32/bfloat16) are one `linear` call forward with the bias
inside, and one `dense_backward` call backward; the MLP's first layer is `linear_gelu`; adaLN,
QK-norm and the gated residual's backward are one pass each; attention is the fused kernel, read in
place from DiT's packed projection and from MMDiT's two streams. What the kernels do not cover
(float16, `attention="xla"`, attention masks) runs as on XLA:CPU (`XlaCpuOps`), attention's
matmuls on oneDNN.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp

from jax_mmdit.ops import reference, xla
from jax_mmdit.ops.onednn import calls

_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16)


def _supported(dtype) -> bool:
    return jnp.dtype(dtype) in _KERNEL_DTYPES


# ---- dense layers --------------------------------------------------------------------------------
@jax.custom_vjp
def dense(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array) -> jax.Array:
    """x @ (w cast to x's dtype) + b -> x's dtype."""
    return calls.linear(x_MxK, w_KxN.astype(x_MxK.dtype), b_N)


def _dense_fwd(x_MxK, w_KxN, b_N):
    w_KxN = w_KxN.astype(x_MxK.dtype)
    return calls.linear(x_MxK, w_KxN, b_N), (x_MxK, w_KxN)


def _dense_bwd(res, g_MxN):
    # dx (x's dtype), dW and db (float32, for the fp32 master weights) from one call.
    x_MxK, w_KxN = res
    return calls.dense_backward(x_MxK, w_KxN, g_MxN.astype(x_MxK.dtype))


dense.defvjp(_dense_fwd, _dense_bwd)


@jax.custom_vjp
def dense_gelu(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array) -> jax.Array:
    """GELU_tanh(x @ w + b) in x's dtype; the backward recomputes GELU' from z = x @ w + b, the only
    residual besides the operands."""
    return calls.linear_gelu(x_MxK, w_KxN.astype(x_MxK.dtype), b_N)[1]


def _dense_gelu_fwd(x_MxK, w_KxN, b_N):
    w_KxN = w_KxN.astype(x_MxK.dtype)
    z_MxN, a_MxN = calls.linear_gelu(x_MxK, w_KxN, b_N)
    return a_MxN, (x_MxK, w_KxN, z_MxN)


def _dense_gelu_bwd(res, g_MxN):
    x_MxK, w_KxN, z_MxN = res
    return calls.dense_backward(x_MxK, w_KxN, calls.gelu_backward(z_MxN, g_MxN.astype(z_MxN.dtype)))


dense_gelu.defvjp(_dense_gelu_fwd, _dense_gelu_bwd)


# ---- rows: adaLN, gated residual, RMSNorm --------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def ln_modulate(x_BxLxD, shift_BxD, scale_BxD, dtype, eps: float):
    """LayerNorm(x) * (1 + scale) + shift in `dtype`, all inputs float32: one pass each way."""
    return calls.adaln_forward(x_BxLxD, shift_BxD, scale_BxD, dtype, eps)


def _ln_modulate_fwd(x_BxLxD, shift_BxD, scale_BxD, dtype, eps):
    return calls.adaln_forward(x_BxLxD, shift_BxD, scale_BxD, dtype, eps), (x_BxLxD, scale_BxD)


def _ln_modulate_bwd(dtype, eps, res, dh_BxLxD):
    x_BxLxD, scale_BxD = res
    return calls.adaln_backward(x_BxLxD, scale_BxD, dh_BxLxD, eps)


ln_modulate.defvjp(_ln_modulate_fwd, _ln_modulate_bwd)


@jax.custom_vjp
def gated_residual(x_BxLxD, gate_BxD, a_BxLxD):
    """x + gate * a whose backward (da and the gate's gradient) is one pass over the cotangent and a."""
    return reference.gated_residual(x_BxLxD, gate_BxD, a_BxLxD)


def _gated_residual_fwd(x_BxLxD, gate_BxD, a_BxLxD):
    return reference.gated_residual(x_BxLxD, gate_BxD, a_BxLxD), (gate_BxD, a_BxLxD)


def _gated_residual_bwd(res, dy_BxLxD):
    gate_BxD, a_BxLxD = res
    da_BxLxD, dgate_BxD = calls.gated_residual_backward(gate_BxD, a_BxLxD, dy_BxLxD)
    return dy_BxLxD, dgate_BxD, da_BxLxD


gated_residual.defvjp(_gated_residual_fwd, _gated_residual_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x_RxD, scale_D, eps: float):
    """RMSNorm of rows, one pass each way."""
    return calls.rms_norm_forward(x_RxD, scale_D, eps)


def _rms_norm_fwd(x_RxD, scale_D, eps):
    return calls.rms_norm_forward(x_RxD, scale_D, eps), (x_RxD, scale_D)


def _rms_norm_bwd(eps, res, dy_RxD):
    x_RxD, scale_D = res
    return calls.rms_norm_backward(x_RxD, scale_D, dy_RxD.astype(x_RxD.dtype), eps)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# ---- attention -----------------------------------------------------------------------------------
@jax.custom_vjp
def attention(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK):
    """Softmax attention as two fused kernels, one per direction -> (B, L, N, K)."""
    return calls.attention_forward(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK)


def _attention_fwd(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK):
    return calls.attention_forward(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK), (q_BxLxNxK, k_BxSxNxK, v_BxSxNxK)


def _attention_bwd(res, do_BxLxNxK):
    q_BxLxNxK, k_BxSxNxK, v_BxSxNxK = res
    return calls.attention_backward(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, do_BxLxNxK.astype(q_BxLxNxK.dtype))


attention.defvjp(_attention_fwd, _attention_bwd)


@jax.custom_vjp
def attention_packed(qkv_BxLx3xNxK):
    """`attention` of the q, k, v packed in one (B, L, 3, N, K) array -> (B, L, N, K); the gradient
    comes back packed the same way (no split copies, no concatenate)."""
    return calls.attention_packed_forward(qkv_BxLx3xNxK)


def _attention_packed_fwd(qkv_BxLx3xNxK):
    return calls.attention_packed_forward(qkv_BxLx3xNxK), qkv_BxLx3xNxK


def _attention_packed_bwd(qkv_BxLx3xNxK, do_BxLxNxK):
    return (calls.attention_packed_backward(qkv_BxLx3xNxK, do_BxLxNxK.astype(qkv_BxLx3xNxK.dtype)),)


attention_packed.defvjp(_attention_packed_fwd, _attention_packed_bwd)


@jax.custom_vjp
def joint_attention(x_qkv: tuple, c_qkv: tuple) -> tuple[jax.Array, jax.Array]:
    """`attention` over the image tokens followed by the context tokens, each stream's q, k, v
    read in place (no concatenates, and no slices of the output or of its gradient)."""
    return calls.attention_joint_forward(x_qkv, c_qkv)


def _joint_attention_fwd(x_qkv, c_qkv):
    return calls.attention_joint_forward(x_qkv, c_qkv), (x_qkv, c_qkv)


def _joint_attention_bwd(res, do):
    x_qkv, c_qkv = res
    dtype = x_qkv[0].dtype
    return calls.attention_joint_backward(x_qkv, c_qkv, do[0].astype(dtype), do[1].astype(dtype))


joint_attention.defvjp(_joint_attention_fwd, _joint_attention_bwd)


def onednn_batched_dot(a, b, transpose_a: bool, transpose_b: bool) -> jax.Array:
    """`xla.softmax_attention`'s batched matmuls on oneDNN (transposes as strides), float32 out."""
    return calls.matmul(a, b, transpose_a, transpose_b)


# ---- FLOP accounting -----------------------------------------------------------------------------
# Model FLOPs per B*H*L*S*D of the attention kernels: two matmuls forward, four backward (the
# backward's recomputed q k^T is not counted, as MFU conventions leave recomputation out).
_ATTENTION_FLOPS = {
    calls.ATTENTION_FWD: 4.0,
    calls.ATTENTION_BWD: 8.0,
    calls.ATTENTION_PACKED_FWD: 4.0,
    calls.ATTENTION_PACKED_BWD: 8.0,
    calls.ATTENTION_JOINT_FWD: 4.0,
    calls.ATTENTION_JOINT_BWD: 8.0,
}
# Matmul FLOPs per M*K*N of the dense-layer kernels (x (M, K), w (K, N)): the forward's matmul, the
# backward's two (dx, dW; the bias gradient's column sum and the GELU are not matmul FLOPs).
_DENSE_FLOPS = {calls.LINEAR: 2.0, calls.LINEAR_GELU: 2.0, calls.DENSE_BWD: 4.0}
# Rank of the leading operands' shapes each kernel's count reads.
_RANKS = {
    **{t: (2, 2) for t in _DENSE_FLOPS},
    calls.ATTENTION_FWD: (4, 4),
    calls.ATTENTION_BWD: (4, 4),
    calls.ATTENTION_PACKED_FWD: (5,),
    calls.ATTENTION_PACKED_BWD: (5, 4),
    calls.ATTENTION_JOINT_FWD: (4, 4, 4, 4),
    calls.ATTENTION_JOINT_BWD: (4, 4, 4, 4),
}
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
# The matmul's output shape.
_OUT = re.compile(r"=\s*b?f(?:16|32)\[([\d,]*)\]\S*\s+custom-call\(")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _call_flops(target: str, line: str) -> float:
    """FLOPs of one kernel call, from its line of compiled HLO text."""
    _, _, operands = line.partition("operand_layout_constraints={")
    shapes = [_dims(m.group(1)) for m in _SHAPE.finditer(operands)]
    if target == calls.MATMUL:  # 2*M*N*K per batch element; K = size(a) / rows of the output
        out = _OUT.search(line)
        if out is None or not shapes:
            raise ValueError(f"unparsed {target} call in HLO: {line.strip()[:200]}")
        out_shape = _dims(out.group(1))
        return 2.0 * math.prod(out_shape) * math.prod(shapes[0]) / math.prod(out_shape[:-1])
    ranks = _RANKS[target]
    shapes = shapes[: len(ranks)]
    if tuple(len(s) for s in shapes) != ranks:
        raise ValueError(f"unparsed {target} call in HLO: {line.strip()[:200]}")
    if target in _DENSE_FLOPS:
        (M, K), N = shapes[0], shapes[1][1]
        return _DENSE_FLOPS[target] * M * K * N
    if target in (calls.ATTENTION_JOINT_FWD, calls.ATTENTION_JOINT_BWD):  # qx, kx, vx, qc: L + T tokens
        (B, L, H, D), T = shapes[0], shapes[3][1]
        return _ATTENTION_FLOPS[target] * B * H * (L + T) ** 2 * D
    if ranks[0] == 4:  # q (B, L, H, D), k (B, S, H, D)
        (B, L, H, D), S = shapes[0], shapes[1][1]
        return _ATTENTION_FLOPS[target] * B * H * L * S * D
    B, L, _, H, D = shapes[0]  # the packed (B, L, 3, H, D) projection
    return _ATTENTION_FLOPS[target] * B * H * L * L * D


def hlo_flops(hlo_text: str) -> float:
    """FLOPs of the kernel calls in compiled HLO text, which XLA's cost analysis counts as zero."""
    total = 0.0
    for line in hlo_text.splitlines():
        target = next((t for t in (calls.MATMUL, *_RANKS) if f'custom_call_target="{t}"' in line), None)
        if target is not None:
            total += _call_flops(target, line)
    return total


# ---- the backend ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class OnednnOps(xla.XlaCpuOps):
    """CPU, on the package's kernels (module docstring). Build and load them first (`ops.resolve`
    does): the methods only emit calls to them."""

    name: ClassVar[str] = "onednn"

    def dense(self, x_MxK, w_KxN, b_N, dtype):
        if not _supported(dtype):
            return super().dense(x_MxK, w_KxN, b_N, dtype)
        return dense(x_MxK.astype(dtype), w_KxN, b_N)

    def dense_gelu(self, x_MxK, w_KxN, b_N, dtype):
        # bf16 rounds x @ w + b before the GELU, as autocast does; no float32 tanh kept for the backward.
        if not _supported(dtype):
            return super().dense_gelu(x_MxK, w_KxN, b_N, dtype)
        return dense_gelu(x_MxK.astype(dtype), w_KxN, b_N)

    def ln_modulate(self, x_BxLxD, shift_BxD, scale_BxD, dtype, eps: float):
        if not _supported(dtype):
            return super().ln_modulate(x_BxLxD, shift_BxD, scale_BxD, dtype, eps)
        f32 = jnp.float32
        return ln_modulate(x_BxLxD.astype(f32), shift_BxD.astype(f32), scale_BxD.astype(f32), jnp.dtype(dtype), eps)

    def gated_residual(self, x_BxLxD, gate_BxD, a_BxLxD):
        if gate_BxD.dtype == x_BxLxD.dtype == jnp.float32 and _supported(a_BxLxD.dtype):
            return gated_residual(x_BxLxD, gate_BxD, a_BxLxD)
        return super().gated_residual(x_BxLxD, gate_BxD, a_BxLxD)

    def rms_norm(self, x, scale_D, eps: float):
        if not _supported(x.dtype):
            return super().rms_norm(x, scale_D, eps)
        return rms_norm(x.reshape(-1, x.shape[-1]), scale_D, eps).reshape(x.shape)

    def _fused(self, *arrays, mask=None) -> bool:
        return self.attention_impl == "auto" and mask is None and all(_supported(a.dtype) for a in arrays)

    def attention(self, q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, mask_BxS=None):
        B, L, N, K = q_BxLxNxK.shape
        if self._fused(q_BxLxNxK, mask=mask_BxS):
            return attention(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK).reshape(B, L, N * K)
        dot = onednn_batched_dot if _supported(q_BxLxNxK.dtype) else xla.xla_batched_dot
        return xla.heads_major_attention(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, mask_BxS, dot)

    def attention_packed(self, qkv_BxLx3xNxK, mask_BxL=None):
        if not self._fused(qkv_BxLx3xNxK, mask=mask_BxL):
            return super().attention_packed(qkv_BxLx3xNxK, mask_BxL)
        B, L, _, N, K = qkv_BxLx3xNxK.shape
        return attention_packed(qkv_BxLx3xNxK).reshape(B, L, N * K)

    def joint_attention(self, x_qkv, c_qkv, mask_BxT=None):
        if not self._fused(x_qkv[0], mask=mask_BxT):
            return super().joint_attention(x_qkv, c_qkv, mask_BxT)
        (B, L, N, K), T = x_qkv[0].shape, c_qkv[0].shape[1]
        o_x, o_c = joint_attention(tuple(x_qkv), tuple(c_qkv))
        return o_x.reshape(B, L, N * K), o_c.reshape(B, T, N * K)

    def flops(self, compiled) -> float | None:
        counted = reference.xla_flops(compiled)
        return None if counted is None else counted + hlo_flops(compiled.as_text() or "")

    def kernel_calls(self, compiled) -> frozenset[str]:
        text = compiled.as_text() or ""
        return frozenset(t for t in calls.TARGETS if f'custom_call_target="{t}"' in text)
