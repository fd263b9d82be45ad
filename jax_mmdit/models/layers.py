"""Blocks shared by DiT and MMDiT.

Conventions (kept in one place so both models and the converters agree):
- Activations are NHWC / (B, L, D). Linear layers see flattened (B*L, D) inputs: on XLA:CPU a 2D
  matmul was measured ~10% faster end to end than a batched 3D one.
- Parameters are float32; `dtype` is the compute dtype of matmul operands (see `matmul`).
  LayerNorm/RMSNorm statistics, adaLN modulation, softmax and the residual stream stay float32:
  a bf16 residual stream would lose precision summed over 28 blocks, and elementwise ops are cheap.
  Linear layers return the compute dtype (bf16 activations between layers), except on CPU without
  the oneDNN kernels, where XLA's matmuls return float32 (see `matmul`).
- Modulation chunks come out in the DiT order (shift, scale, gate, ...). Sinusoids use the DiT/SD3
  convention: cos first, frequencies exp(-ln(10000) * i / half) for i in [0, half).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_mmdit.kernels import onednn

Dtype = Any

# The model takes t in [0, 1]; published DiT/SD3 embed t * 1000, so we scale before the sinusoid to
# keep the frequency range (and converted weights) meaningful.
TIME_SCALE = 1000.0
# Sinusoid width fed to the timestep MLP (DiT and SD3 both use 256).
TIME_FREQ_DIM = 256
# Epsilon of every LayerNorm/RMSNorm in DiT and SD3.
NORM_EPS = 1e-6

_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()
_normal002 = nnx.initializers.normal(stddev=0.02)


class FixedEmbedding(nnx.Variable):
    """A constant table kept in the model state (checkpointed, counted like DiT counts its
    `requires_grad=False` pos_embed) but not an `nnx.Param`, so grads/optimisers skip it."""


# ---- matmuls -------------------------------------------------------------------------------------
# Tile height of `_materialised_transpose`: rows per tile, divided down to fit any M.
_TRANSPOSE_TILE = 64


def _materialised_transpose(x_xMxK: jax.Array) -> jax.Array:
    """Swaps the last two axes, (..., M, K) -> (..., K, M), written as a transpose of (M/T, T, K)
    tiles, which XLA cannot fold into the consuming dot. A plain transpose is folded into a
    transposed-operand ("TN") dot, a layout XLA:CPU's bf16 matmul kernel (YNNPACK) does not take,
    so XLA upcasts both operands and runs an fp32 dot instead: DiT-S/2's fc1 weight gradient at
    batch 32 took ~95 ms that way, 14 ms with this copy (~3 ms) first."""
    *lead, M, K = x_xMxK.shape
    t = math.gcd(M, _TRANSPOSE_TILE)
    n = len(lead)
    tiles = x_xMxK.reshape(*lead, M // t, t, K)
    return tiles.transpose(*range(n), n + 2, n, n + 1).reshape(*lead, K, M)


@jax.custom_vjp
def _bf16_matmul(x_MxK: jax.Array, w_KxN: jax.Array) -> jax.Array:
    """bf16 x @ (float32 w cast to bf16) -> float32, every matmul of forward and backward written
    as bf16 x bf16 -> f32 in a layout XLA:CPU hands to its native bf16 kernel (YNNPACK, AVX512-BF16
    / AMX). Differentiating a plain dot instead gives f32 cotangents and transposed layouts, which
    XLA:CPU runs as fp32 dots after upcasting: with plain bf16 dots the DiT-S/2 bf16 train step at
    batch 32 ran at 3.38 img/s, with this 5.61 img/s (same machine, alternated runs)."""
    return jnp.einsum("mk,kn->mn", x_MxK, w_KxN.astype(x_MxK.dtype), preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(x_MxK, w_KxN):
    return _bf16_matmul(x_MxK, w_KxN), (x_MxK, w_KxN.astype(x_MxK.dtype))


def _bf16_matmul_bwd(res, g_MxN):
    x_MxK, w_KxN = res
    g_MxN = g_MxN.astype(x_MxK.dtype)
    # dx contracts both operands' last axes ("NT"), which YNNPACK takes as is.
    dx_MxK = jnp.einsum("mn,kn->mk", g_MxN, w_KxN, preferred_element_type=jnp.float32)
    # The weight gradient stays float32: it goes straight into the fp32 master weights.
    dw_KxN = jnp.einsum("km,mn->kn", _materialised_transpose(x_MxK), g_MxN, preferred_element_type=jnp.float32)
    return dx_MxK.astype(x_MxK.dtype), dw_KxN


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


@jax.custom_vjp
def _onednn_dense(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array) -> jax.Array:
    """x @ (w cast to x's dtype) + b -> x's dtype on oneDNN (CPU; see `jax_mmdit.kernels.onednn`),
    forward and backward."""
    return onednn.linear(x_MxK, w_KxN.astype(x_MxK.dtype), b_N)


def _onednn_dense_fwd(x_MxK, w_KxN, b_N):
    w_KxN = w_KxN.astype(x_MxK.dtype)
    return onednn.linear(x_MxK, w_KxN, b_N), (x_MxK, w_KxN)


def _onednn_dense_bwd(res, g_MxN):
    # dx (x's dtype), dW and db (float32, for the fp32 master weights) from one call, the
    # transposes as strides. As three calls XLA ran the weight gradient beside the bias gradient's
    # column sum, two OpenMP teams on the same cores (onednn_kernels.cc; docs/performance.md).
    x_MxK, w_KxN = res
    return onednn.dense_backward(x_MxK, w_KxN, g_MxN.astype(x_MxK.dtype))


_onednn_dense.defvjp(_onednn_dense_fwd, _onednn_dense_bwd)


@jax.custom_vjp
def _onednn_dense_gelu(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array) -> jax.Array:
    """GELU_tanh(x @ w + b) in x's dtype on oneDNN: one call for the matmul, bias and GELU; the
    backward recomputes GELU' from z = x @ w + b, the only residual besides the operands."""
    return onednn.linear_gelu(x_MxK, w_KxN.astype(x_MxK.dtype), b_N)[1]


def _onednn_dense_gelu_fwd(x_MxK, w_KxN, b_N):
    w_KxN = w_KxN.astype(x_MxK.dtype)
    z_MxN, a_MxN = onednn.linear_gelu(x_MxK, w_KxN, b_N)
    return a_MxN, (x_MxK, w_KxN, z_MxN)


def _onednn_dense_gelu_bwd(res, g_MxN):
    x_MxK, w_KxN, z_MxN = res
    return onednn.dense_backward(x_MxK, w_KxN, onednn.gelu_backward(z_MxN, g_MxN.astype(z_MxN.dtype)))


_onednn_dense_gelu.defvjp(_onednn_dense_gelu_fwd, _onednn_dense_gelu_bwd)


def _use_onednn(dtype: Dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16) and onednn.enabled()  # CPU only


def matmul(x_MxK: jax.Array, w_KxN: jax.Array, dtype: Dtype) -> jax.Array:
    """x @ w with operands in compute dtype `dtype` and float32 accumulation; w is the float32 kernel.
    The XLA path of `dense` (CPU runs with the oneDNN kernels take `_onednn_dense` instead).

    Off CPU: operands cast to `dtype`, result in `dtype` (the usual mixed precision; GPUs fuse the
    elementwise ops that follow and keep bf16 activations, half the memory). float32 elsewhere: a
    plain dot. On CPU the result is float32: XLA:CPU computes bf16 elementwise ops in fp32 anyway
    but splits a bf16 chain (bias + GELU + cast) into one pass per op, measured 8% slower per DiT
    block. bf16 takes `_bf16_matmul`; fp16 asks for fp16 results, the one fp16 dot XLA:CPU supports
    under every matmul precision (it computes it in fp32 internally)."""
    dt = jnp.dtype(dtype)
    if dt == jnp.float32:
        return jnp.dot(x_MxK.astype(jnp.float32), w_KxN)
    x_MxK = x_MxK.astype(dt)
    if jax.default_backend() != "cpu":
        return jnp.dot(x_MxK, w_KxN.astype(dt))
    if dt == jnp.bfloat16:
        return _bf16_matmul(x_MxK, w_KxN)
    return jnp.dot(x_MxK, w_KxN.astype(dt), preferred_element_type=dt).astype(jnp.float32)


def dense(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array, dtype: Dtype) -> jax.Array:
    """x @ w + b with operands in compute dtype `dtype` (w, b the float32 parameters). On CPU with
    the oneDNN kernels: one call with the bias inside, result in `dtype` (bf16 activations between
    layers, as under PyTorch autocast); elsewhere `matmul` + bias."""
    if _use_onednn(dtype):
        return _onednn_dense(x_MxK.astype(dtype), w_KxN, b_N)
    y = matmul(x_MxK, w_KxN, dtype)
    return y + b_N.astype(y.dtype)


def dense_gelu(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array, dtype: Dtype) -> jax.Array:
    """GELU_tanh(`dense`(x, w, b)). On CPU with the oneDNN kernels: one call, in `dtype` (bf16
    rounds x @ w + b before the GELU, as autocast does), and no float32 tanh kept for the backward;
    elsewhere `dense` then `jax.nn.gelu`."""
    if _use_onednn(dtype):
        return _onednn_dense_gelu(x_MxK.astype(dtype), w_KxN, b_N)
    return jax.nn.gelu(dense(x_MxK, w_KxN, b_N, dtype), approximate=True)


class Dense(nnx.Module):
    """y = x @ kernel + bias over the last axis, computed by `dense`. Parameters (float32) have
    nnx.Linear's names, shapes and initialisation order, so converters, sharding and checkpoints
    see the same tree."""

    def __init__(self, in_dim: int, out_dim: int, dtype: Dtype, rngs: nnx.Rngs, init=_xavier):
        self.dtype = dtype
        self.kernel = nnx.Param(init(rngs.params(), (in_dim, out_dim), jnp.float32))
        self.bias = nnx.Param(_zeros(rngs.params(), (out_dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, K = x.shape[:-1], x.shape[-1]
        return dense(x.reshape(-1, K), self.kernel[...], self.bias[...], self.dtype).reshape(*lead, -1)


def linear(in_dim: int, out_dim: int, dtype: Dtype, rngs: nnx.Rngs, init=_xavier) -> Dense:
    return Dense(in_dim, out_dim, dtype, rngs, init=init)


# ---- normalisation / modulation ------------------------------------------------------------------
def layer_norm(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """LayerNorm without affine params (adaLN supplies scale/shift); returns float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


def ln_modulate(x_BxLxD: jax.Array, shift_BxD: jax.Array, scale_BxD: jax.Array, dtype: Dtype) -> jax.Array:
    """adaLN: LayerNorm(x) * (1 + scale) + shift, computed in fp32, returned in compute dtype.
    On CPU with the kernels: one pass forward and one backward (`_kernel_ln_modulate`)."""
    if _use_onednn(dtype):
        f32 = jnp.float32
        return _kernel_ln_modulate(x_BxLxD.astype(f32), shift_BxD.astype(f32), scale_BxD.astype(f32), jnp.dtype(dtype))
    h = layer_norm(x_BxLxD) * (1.0 + scale_BxD[:, None, :]) + shift_BxD[:, None, :]
    return h.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kernel_ln_modulate(x_BxLxD: jax.Array, shift_BxD: jax.Array, scale_BxD: jax.Array, dtype) -> jax.Array:
    """`ln_modulate` as the CPU adaLN kernels (`onednn.adaln_forward` / `adaln_backward`): XLA:CPU
    spends several passes over the (B, L, D) arrays on each direction (statistics, normalise and
    convert; reductions over D and over L, converts), the kernels one."""
    return _kernel_ln_modulate_fwd(x_BxLxD, shift_BxD, scale_BxD, dtype)[0]


def _kernel_ln_modulate_fwd(x_BxLxD, shift_BxD, scale_BxD, dtype):
    return onednn.adaln_forward(x_BxLxD, shift_BxD, scale_BxD, dtype, NORM_EPS), (x_BxLxD, scale_BxD)


def _kernel_ln_modulate_bwd(dtype, res, dh_BxLxD):
    x_BxLxD, scale_BxD = res
    return onednn.adaln_backward(x_BxLxD, scale_BxD, dh_BxLxD, NORM_EPS)


_kernel_ln_modulate.defvjp(_kernel_ln_modulate_fwd, _kernel_ln_modulate_bwd)


def gated_residual(x_BxLxD: jax.Array, gate_BxD: jax.Array, a_BxLxD: jax.Array) -> jax.Array:
    """x + gate * a: adaLN-Zero's gated branch output a added to the float32 residual stream x. On
    CPU with the kernels the backward is one pass (`_kernel_gated_residual`)."""
    if gate_BxD.dtype == jnp.float32 and x_BxLxD.dtype == jnp.float32 and _use_onednn(a_BxLxD.dtype):
        return _kernel_gated_residual(x_BxLxD, gate_BxD, a_BxLxD)
    return x_BxLxD + gate_BxD[:, None, :] * a_BxLxD


@jax.custom_vjp
def _kernel_gated_residual(x_BxLxD: jax.Array, gate_BxD: jax.Array, a_BxLxD: jax.Array) -> jax.Array:
    """`gated_residual` whose backward is `onednn.gated_residual_backward`: da and the gate's
    gradient from one read of the cotangent and a, where XLA:CPU made two passes, reducing over L on
    one thread (DiT-S/2 b32 bf16: ~45 ms per step in 24 such reductions)."""
    return x_BxLxD + gate_BxD[:, None, :] * a_BxLxD


def _kernel_gated_residual_fwd(x_BxLxD, gate_BxD, a_BxLxD):
    return x_BxLxD + gate_BxD[:, None, :] * a_BxLxD, (gate_BxD, a_BxLxD)


def _kernel_gated_residual_bwd(res, dy_BxLxD):
    gate_BxD, a_BxLxD = res
    da_BxLxD, dgate_BxD = onednn.gated_residual_backward(gate_BxD, a_BxLxD, dy_BxLxD)
    return dy_BxLxD, dgate_BxD, da_BxLxD


_kernel_gated_residual.defvjp(_kernel_gated_residual_fwd, _kernel_gated_residual_bwd)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale (used on per-head queries/keys)."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        if _use_onednn(x.dtype):
            # One pass each way on CPU (`_kernel_rms_norm`).
            return _kernel_rms_norm(x.reshape(-1, x.shape[-1]), self.scale[...], self.eps).reshape(x.shape)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...]).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kernel_rms_norm(x_RxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """`RMSNorm` as the CPU kernels (`onednn.rms_norm_forward` / `_backward`): XLA:CPU made several
    passes over the (B, L, H, D) queries and keys each way, and reduced the scale's gradient on one
    thread."""
    return onednn.rms_norm_forward(x_RxD, scale_D, eps)


def _kernel_rms_norm_fwd(x_RxD, scale_D, eps):
    return onednn.rms_norm_forward(x_RxD, scale_D, eps), (x_RxD, scale_D)


def _kernel_rms_norm_bwd(eps, res, dy_RxD):
    x_RxD, scale_D = res
    return onednn.rms_norm_backward(x_RxD, scale_D, dy_RxD.astype(x_RxD.dtype), eps)


_kernel_rms_norm.defvjp(_kernel_rms_norm_fwd, _kernel_rms_norm_bwd)


class Modulation(nnx.Module):
    """SiLU -> Linear(D, n*D), zero-initialised (adaLN-Zero: a new block is the identity)."""

    def __init__(self, hidden: int, n: int, dtype: Dtype, rngs: nnx.Rngs):
        self.n = n
        self.linear = linear(hidden, n * hidden, dtype, rngs, init=_zeros)

    def __call__(self, c_BxD: jax.Array) -> list[jax.Array]:
        out_BxnD = self.linear(jax.nn.silu(c_BxD)).astype(jnp.float32)
        return jnp.split(out_BxnD, self.n, axis=-1)


# ---- conditioning embedders ----------------------------------------------------------------------
def timestep_sinusoid(t_B: jax.Array, dim: int = TIME_FREQ_DIM, max_period: float = 10000.0) -> jax.Array:
    """[cos, sin] features of t (already scaled to [0, 1000]); float32, shape (B, dim)."""
    half = dim // 2
    freqs_H = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args_BxH = t_B.astype(jnp.float32)[:, None] * freqs_H[None, :]
    return jnp.concatenate([jnp.cos(args_BxH), jnp.sin(args_BxH)], axis=-1)


class MlpEmbedder(nnx.Module):
    """Linear -> SiLU -> Linear: embeds a vector (timestep features, pooled text) into D."""

    def __init__(self, in_dim: int, hidden: int, dtype: Dtype, rngs: nnx.Rngs, init=_xavier):
        self.fc1 = linear(in_dim, hidden, dtype, rngs, init=init)
        self.fc2 = linear(hidden, hidden, dtype, rngs, init=init)

    def __call__(self, v_BxI: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(v_BxI))).astype(jnp.float32)


class TimestepEmbedder(nnx.Module):
    """t in [0, 1] -> sinusoid of 1000*t -> MLP -> (B, D) float32."""

    def __init__(self, hidden: int, dtype: Dtype, rngs: nnx.Rngs):
        # DiT initialises the timestep MLP with N(0, 0.02).
        self.mlp = MlpEmbedder(TIME_FREQ_DIM, hidden, dtype, rngs, init=_normal002)

    def __call__(self, t_B: jax.Array) -> jax.Array:
        return self.mlp(timestep_sinusoid(t_B.astype(jnp.float32) * TIME_SCALE))


class LabelEmbedder(nnx.Module):
    """Class label -> (B, width). Row `num_classes` is the null class used for classifier-free
    guidance, so the table has num_classes + 1 rows."""

    def __init__(self, num_classes: int, width: int, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.table = nnx.Embed(num_classes + 1, width, embedding_init=_normal002, rngs=rngs)

    def __call__(self, y_B: jax.Array) -> jax.Array:
        # jnp.take's default "fill" mode turns out-of-range labels into NaN rows: loud, not silent.
        return self.table(y_B.astype(jnp.int32))


# ---- tokens in / out -----------------------------------------------------------------------------
def _largest_group_count(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class PatchEmbed(nnx.Module):
    """(B, H, W, C) -> (B, L, D) tokens. Patchify is a reshape + one matmul (same maths and
    parameter count as DiT's stride-p conv; kernel rows are ordered (ph, pw, c)). With
    stem="conv", a 3x3 conv + GroupNorm + SiLU first gives each patch a view of its neighbours,
    which helps on small images with few pixels per patch."""

    def __init__(self, in_channels: int, patch: int, hidden: int, stem: str, dtype: Dtype, rngs: nnx.Rngs):
        self.patch, self.dtype = patch, dtype
        if stem == "conv":
            width = hidden // 4
            self.stem_conv = nnx.Conv(in_channels, width, (3, 3), padding="SAME", dtype=dtype, rngs=rngs)
            self.stem_norm = nnx.GroupNorm(width, num_groups=_largest_group_count(width), epsilon=NORM_EPS, rngs=rngs)
            in_channels = width
        else:
            self.stem_conv = self.stem_norm = None
        self.proj = linear(patch * patch * in_channels, hidden, dtype, rngs)

    def __call__(self, x_BxHxWxC: jax.Array) -> jax.Array:
        x = x_BxHxWxC.astype(self.dtype)
        if self.stem_conv is not None:
            x = self.stem_norm(self.stem_conv(x).astype(jnp.float32))
            x = jax.nn.silu(x).astype(self.dtype)
        B, H, W, C = x.shape
        p = self.patch
        h, w = H // p, W // p
        x = x.reshape(B, h, p, w, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(B * h * w, p * p * C)
        return self.proj(x).astype(jnp.float32).reshape(B, h * w, -1)


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2D sin-cos table (grid*grid, dim) as in DiT/MAE (float64 maths, float32 out).

    Token (i, j) (row i, column j) gets [sincos_{dim/2}(j), sincos_{dim/2}(i)], each [sin, cos]."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def make_pos_embed(kind: str, grid: int, hidden: int, rngs: nnx.Rngs) -> nnx.Variable:
    if kind == "sincos":
        return FixedEmbedding(jnp.asarray(sincos_pos_embed_2d(hidden, grid)))
    return nnx.Param(_normal002(rngs.params(), (grid * grid, hidden), jnp.float32))


def unpatchify(x_BxLxK: jax.Array, patch: int, channels: int) -> jax.Array:
    """(B, h*w, p*p*C) -> (B, h*p, w*p, C); inverse of PatchEmbed's (ph, pw, c) ordering."""
    B, L, _ = x_BxLxK.shape
    g = math.isqrt(L)
    x = x_BxLxK.reshape(B, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, g * patch, g * patch, channels)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) + Linear to p*p*C_out; both zero-initialised so a new model outputs 0."""

    def __init__(self, hidden: int, patch: int, out_channels: int, dtype: Dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.modulation = Modulation(hidden, 2, dtype, rngs)
        self.linear = linear(hidden, patch * patch * out_channels, dtype, rngs, init=_zeros)

    def __call__(self, x_BxLxD: jax.Array, c_BxD: jax.Array) -> jax.Array:
        B, L, D = x_BxLxD.shape
        shift, scale = self.modulation(c_BxD)
        h = ln_modulate(x_BxLxD, shift, scale, self.dtype).reshape(B * L, D)
        return self.linear(h).astype(jnp.float32).reshape(B, L, -1)


# ---- MLP -----------------------------------------------------------------------------------------
class Mlp(nnx.Module):
    """Token MLP on flattened (N, D) inputs. "gelu": Linear-GELU(tanh)-Linear (DiT/SD3).
    "swiglu": one fused Linear to [gate | value], silu(gate) * value, Linear; hidden is 2/3 of the
    GELU width (rounded up to a multiple of 8) so both variants have about the same parameters."""

    def __init__(self, hidden: int, ratio: float, kind: str, dtype: Dtype, rngs: nnx.Rngs):
        self.kind = kind
        inner = int(hidden * ratio)
        if kind == "swiglu":
            inner = -(-int(inner * 2 / 3) // 8) * 8
            self.fc1 = linear(hidden, 2 * inner, dtype, rngs)
        else:
            self.fc1 = linear(hidden, inner, dtype, rngs)
        self.fc2 = linear(inner, hidden, dtype, rngs)

    def __call__(self, h_NxD: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            gate, value = jnp.split(self.fc1(h_NxD), 2, axis=-1)
            return self.fc2(jax.nn.silu(gate) * value)
        return self.fc2(dense_gelu(h_NxD, self.fc1.kernel[...], self.fc1.bias[...], self.fc1.dtype))
