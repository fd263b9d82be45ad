"""Softmax attention: the q/k/v projection of a token stream (`QKV`) and `attention` itself, on
XLA (`_softmax_attention`, heads-major batched matmuls with a hand-written backward) or, on CPU,
the fused oneDNN kernels (`kernels.onednn`), which DiT's self-attention calls on the packed
projection. Layout conventions are `layers`'."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mmdit.kernels import onednn
from jax_mmdit.models.layers import Dtype, RMSNorm, _materialised_transpose, _use_onednn, linear


class QKV(nnx.Module):
    """Fused q/k/v projection of one token stream (one matmul), optional per-head RMS QK-norm.
    Kernel columns are [q | k | v], each (heads, head_dim): the layout of DiT/timm's qkv Linear.
    Returns (B, L, N, K) tensors, the layout the projection writes (no transposes here)."""

    def __init__(self, hidden: int, num_heads: int, qk_norm: bool, dtype: Dtype, rngs: nnx.Rngs):
        self.num_heads, self.dtype = num_heads, dtype
        self.qkv = linear(hidden, 3 * hidden, dtype, rngs)
        head_dim = hidden // num_heads
        self.q_norm = RMSNorm(head_dim) if qk_norm else None
        self.k_norm = RMSNorm(head_dim) if qk_norm else None

    def self_attention(self, h_MxD: jax.Array, batch: int, implementation: str) -> jax.Array:
        """`attention` of the stream's tokens over themselves -> (B, L, D). Without QK-norm, the
        fused CPU kernels read q, k, v in place from the (B, L, 3, N, K) projection and write their
        gradient packed the same way: no split copies, no concatenate of dq, dk, dv."""
        M, D = h_MxD.shape
        if self.q_norm is None and implementation == "auto" and _use_onednn(self.dtype):
            N = self.num_heads
            qkv_BxLx3xNxK = self.qkv(h_MxD).astype(self.dtype).reshape(batch, M // batch, 3, N, D // N)
            return _onednn_self_attention(qkv_BxLx3xNxK).reshape(batch, M // batch, D)
        return attention(*self(h_MxD, batch), implementation)

    def __call__(self, h_MxD: jax.Array, batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        M, D = h_MxD.shape
        N = self.num_heads
        qkv_BxLx3xNxK = self.qkv(h_MxD).reshape(batch, M // batch, 3, N, D // N)
        # split, not indexing: the gradient of a split is one concatenate, while three index
        # slices each become a zero-padded full-size array that XLA then adds up.
        q_BxLxNxK, k_BxLxNxK, v_BxLxNxK = (a[:, :, 0] for a in jnp.split(qkv_BxLx3xNxK, 3, axis=2))
        if self.q_norm is not None:
            q_BxLxNxK, k_BxLxNxK = self.q_norm(q_BxLxNxK), self.k_norm(k_BxLxNxK)
        # The projection may come back in float32 (see `matmul`); attention's matmuls take the
        # compute dtype, and the cast fuses into the split above.
        return q_BxLxNxK.astype(self.dtype), k_BxLxNxK.astype(self.dtype), v_BxLxNxK.astype(self.dtype)


def _batched_dot(a: jax.Array, b: jax.Array, transpose_a: bool, transpose_b: bool, use_onednn: bool) -> jax.Array:
    """op(a) @ op(b) over leading batch axes -> float32. On XLA, a transposed `a` goes through
    `_materialised_transpose` (XLA:CPU upcasts the folded "TN" layout to fp32); oneDNN takes it as
    strides."""
    if use_onednn:
        return onednn.matmul(a, b, transpose_a, transpose_b)
    if transpose_a:
        a = _materialised_transpose(a)
    spec = "...mk,...nk->...mn" if transpose_b else "...mk,...kn->...mn"
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_attention(q_BxNxLxK: jax.Array, k_BxNxSxK: jax.Array, v_BxNxSxK: jax.Array, use_onednn: bool) -> jax.Array:
    """softmax(q k^T / sqrt(K)) v -> (B, N, L, K) in v's dtype; logits and softmax in float32.

    A hand-written backward (the standard softmax-attention one) because autodiff of the forward
    keeps the float32 exp(logits) as well as the compute-dtype probabilities (DiT-S/2 at batch 128
    in bf16: 458 MiB of residuals per block, 264 MiB here) and leaves two gradient matmuls in the
    transposed layout XLA:CPU upcasts to fp32. Measured on the DiT-S/2 bf16 train step at batch 32:
    +8% img/s, XLA memory plan 4.58 -> 3.91 GiB; fp32 unchanged within noise (-2%). With
    `use_onednn` its six matmuls run on oneDNN (q k^T: 2.5x XLA:CPU's batched dot)."""
    return _softmax_attention_fwd(q_BxNxLxK, k_BxNxSxK, v_BxNxSxK, use_onednn)[0]


def _softmax_attention_fwd(q_BxNxLxK, k_BxNxSxK, v_BxNxSxK, use_onednn):
    # Scaling q rather than the logits: XLA:CPU materialised the broadcast scale at logits size.
    q_BxNxLxK = q_BxNxLxK * jnp.asarray(q_BxNxLxK.shape[-1] ** -0.5, q_BxNxLxK.dtype)
    logits_BxNxLxS = _batched_dot(q_BxNxLxK, k_BxNxSxK, False, True, use_onednn)
    # Max-subtraction only guards exp against overflow; softmax is invariant to it.
    e_BxNxLxS = jnp.exp(logits_BxNxLxS - jnp.max(logits_BxNxLxS, axis=-1, keepdims=True))
    p_BxNxLxS = (e_BxNxLxS / jnp.sum(e_BxNxLxS, axis=-1, keepdims=True)).astype(v_BxNxSxK.dtype)
    o_BxNxLxK = _batched_dot(p_BxNxLxS, v_BxNxSxK, False, False, use_onednn).astype(v_BxNxSxK.dtype)
    return o_BxNxLxK, (q_BxNxLxK, k_BxNxSxK, v_BxNxSxK, p_BxNxLxS, o_BxNxLxK)


def _softmax_attention_bwd(use_onednn, res, do_BxNxLxK):
    q_BxNxLxK, k_BxNxSxK, v_BxNxSxK, p_BxNxLxS, o_BxNxLxK = res  # q already scaled
    f32 = jnp.float32
    do_BxNxLxK = do_BxNxLxK.astype(v_BxNxSxK.dtype)
    dv_BxNxSxK = _batched_dot(p_BxNxLxS, do_BxNxLxK, True, False, use_onednn)
    dp_BxNxLxS = _batched_dot(do_BxNxLxK, v_BxNxSxK, False, True, use_onednn)
    # Softmax backward: dlogits = p * (dp - sum_s p * dp), and sum_s p * dp = sum_k do * o.
    delta_BxNxLx1 = jnp.sum(do_BxNxLxK.astype(f32) * o_BxNxLxK.astype(f32), axis=-1, keepdims=True)
    ds_BxNxLxS = (p_BxNxLxS.astype(f32) * (dp_BxNxLxS - delta_BxNxLx1)).astype(q_BxNxLxK.dtype)
    scale = q_BxNxLxK.shape[-1] ** -0.5
    dq_BxNxLxK = _batched_dot(ds_BxNxLxS, k_BxNxSxK, False, False, use_onednn) * scale
    dk_BxNxSxK = _batched_dot(ds_BxNxLxS, q_BxNxLxK, True, False, use_onednn)
    return (
        dq_BxNxLxK.astype(q_BxNxLxK.dtype), dk_BxNxSxK.astype(k_BxNxSxK.dtype), dv_BxNxSxK.astype(v_BxNxSxK.dtype)
    )


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


@jax.custom_vjp
def _onednn_attention(q_BxLxNxK: jax.Array, k_BxSxNxK: jax.Array, v_BxSxNxK: jax.Array) -> jax.Array:
    """Softmax attention as two oneDNN kernels (`kernels/attention_kernels.cc`), one per direction: per
    head, logits, softmax and both matmuls run in cache, and the backward recomputes the
    probabilities rather than keeping them. Against `_softmax_attention` on oneDNN matmuls
    (`python -m benchmarks.bench_attention`, B=32, L=256, 6x64 heads): bf16 forward+backward
    1.37x, fp32 1.18x; whole train steps in docs/performance.md."""
    return onednn.attention_forward(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK)


def _onednn_attention_fwd(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK):
    return onednn.attention_forward(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK), (q_BxLxNxK, k_BxSxNxK, v_BxSxNxK)


def _onednn_attention_bwd(res, do_BxLxNxK):
    q_BxLxNxK, k_BxSxNxK, v_BxSxNxK = res
    return onednn.attention_backward(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK, do_BxLxNxK.astype(q_BxLxNxK.dtype))


_onednn_attention.defvjp(_onednn_attention_fwd, _onednn_attention_bwd)


@jax.custom_vjp
def _onednn_self_attention(qkv_BxLx3xNxK: jax.Array) -> jax.Array:
    """`_onednn_attention` of the q, k, v packed in one (B, L, 3, N, K) array -> (B, L, N, K)."""
    return onednn.attention_packed_forward(qkv_BxLx3xNxK)


def _onednn_self_attention_fwd(qkv_BxLx3xNxK):
    return onednn.attention_packed_forward(qkv_BxLx3xNxK), qkv_BxLx3xNxK


def _onednn_self_attention_bwd(qkv_BxLx3xNxK, do_BxLxNxK):
    return (onednn.attention_packed_backward(qkv_BxLx3xNxK, do_BxLxNxK.astype(qkv_BxLx3xNxK.dtype)),)


_onednn_self_attention.defvjp(_onednn_self_attention_fwd, _onednn_self_attention_bwd)


def attention(q_BxLxNxK: jax.Array, k_BxSxNxK: jax.Array, v_BxSxNxK: jax.Array, implementation: str) -> jax.Array:
    """Softmax attention -> (B, L, N*K). Logits, softmax statistics and accumulation are fp32.

    "auto" off-CPU and "cudnn" call `jax.nn.dot_product_attention`; "auto" on a GPU with bf16/fp16
    tries cuDNN flash attention first and falls back to jax's XLA kernel (untested here: no GPU).
    On CPU, "auto" runs the fused oneDNN kernels when they are enabled (`kernels.onednn`), and
    "xla" (or "auto" without them) `_softmax_attention`, measured on XLA:CPU (B=32, L=256, 6x64
    heads) at 31 ms forward / 155 ms forward+backward against 96 / 260 ms for jax's version: the
    heads-major layout avoids transposes around the batched matmuls."""
    B, L, N, K = q_BxLxNxK.shape
    if implementation == "cudnn" or (implementation == "auto" and jax.default_backend() != "cpu"):
        q, k, v = q_BxLxNxK, k_BxSxNxK, v_BxSxNxK
        if implementation == "auto" and jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
            # jax's None never picks cuDNN (0.10): ask for its flash kernel, and fall back to XLA
            # when this cuDNN or shape is not supported (jax checks that while tracing).
            try:
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn").reshape(B, L, N * K)
            except (NotImplementedError, ValueError, RuntimeError):
                pass
        impl = "cudnn" if implementation == "cudnn" else None
        return jax.nn.dot_product_attention(q, k, v, implementation=impl).reshape(B, L, N * K)
    use_onednn = _use_onednn(q_BxLxNxK.dtype)
    if use_onednn and implementation == "auto":
        return _onednn_attention(q_BxLxNxK, k_BxSxNxK, v_BxSxNxK).reshape(B, L, N * K)
    q, k, v = (a.transpose(0, 2, 1, 3) for a in (q_BxLxNxK, k_BxSxNxK, v_BxSxNxK))
    o_BxNxLxK = _softmax_attention(q, k, v, use_onednn)
    return o_BxNxLxK.transpose(0, 2, 1, 3).reshape(B, L, N * K)


@jax.custom_vjp
def _onednn_joint_attention(x_qkv: tuple, c_qkv: tuple) -> tuple[jax.Array, jax.Array]:
    """`_onednn_attention` over the image tokens followed by the context tokens, each stream's q,
    k, v given separately: the kernels read the two streams in place (no concatenates, and no
    slices of the output or of its gradient)."""
    return onednn.attention_joint_forward(x_qkv, c_qkv)


def _onednn_joint_attention_fwd(x_qkv, c_qkv):
    return onednn.attention_joint_forward(x_qkv, c_qkv), (x_qkv, c_qkv)


def _onednn_joint_attention_bwd(res, do):
    x_qkv, c_qkv = res
    dtype = x_qkv[0].dtype
    return onednn.attention_joint_backward(x_qkv, c_qkv, do[0].astype(dtype), do[1].astype(dtype))


_onednn_joint_attention.defvjp(_onednn_joint_attention_fwd, _onednn_joint_attention_bwd)


def joint_attention(x_qkv: tuple, c_qkv: tuple, implementation: str) -> tuple[jax.Array, jax.Array]:
    """MMDiT's joint attention: `attention` over the image stream's tokens (q, k, v (B, L, N, K))
    followed by the context stream's ((B, T, N, K)) -> (o_x (B, L, N*K), o_c (B, T, N*K)). On CPU
    with the fused kernels ("auto") the two streams are read in place; elsewhere they are
    concatenated (image first, as diffusers orders them; attention is permutation-equivariant)."""
    B, L, N, K = x_qkv[0].shape
    T = c_qkv[0].shape[1]
    if implementation == "auto" and _use_onednn(x_qkv[0].dtype):
        o_x, o_c = _onednn_joint_attention(tuple(x_qkv), tuple(c_qkv))
        return o_x.reshape(B, L, N * K), o_c.reshape(B, T, N * K)
    o_BxSxD = attention(*(jnp.concatenate([a, b], axis=1) for a, b in zip(x_qkv, c_qkv)), implementation)
    return o_BxSxD[:, :L], o_BxSxD[:, L:]
