"""Blocks shared by DiT and MMDiT, written in the operations of `jax_mmdit.ops` (each module is
built with the `ops` backend it calls).

Conventions (kept in one place so both models and the converters agree):
- Activations are NHWC / (B, L, D). Linear layers see flattened (B*L, D) inputs: on XLA:CPU a 2D
  matmul was measured ~10% faster end to end than a batched 3D one.
- Parameters are float32; `dtype` is the compute dtype of matmul operands. LayerNorm/RMSNorm
  statistics, adaLN modulation, softmax and the residual stream stay float32: a bf16 residual
  stream would lose precision summed over 28 blocks, and elementwise ops are cheap. A linear
  layer returns its compute dtype or float32, as its backend does: cast where it matters.
- Modulation chunks come out in the DiT order (shift, scale, gate, ...). Sinusoids use the DiT/SD3
  convention: cos first, frequencies exp(-ln(10000) * i / half) for i in [0, half).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_mmdit.ops import Ops
from jax_mmdit.ops.reference import Dtype

# The model takes t in [0, 1]; published DiT/SD3 embed t * 1000, so by default we scale before the
# sinusoid to keep the frequency range (and converted weights) meaningful (ModelConfig.time_scale).
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


class Dense(nnx.Module):
    """y = x @ kernel + bias over the last axis (`ops.dense`). Parameters (float32) have
    nnx.Linear's names, shapes and initialisation order, so converters, sharding and checkpoints
    see the same tree."""

    def __init__(self, in_dim: int, out_dim: int, dtype: Dtype, ops: Ops, rngs: nnx.Rngs, init=_xavier):
        self.dtype, self.ops = dtype, ops
        self.kernel = nnx.Param(init(rngs.params(), (in_dim, out_dim), jnp.float32))
        self.bias = nnx.Param(_zeros(rngs.params(), (out_dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        lead, K = x.shape[:-1], x.shape[-1]
        return self.ops.dense(x.reshape(-1, K), self.kernel[...], self.bias[...], self.dtype).reshape(*lead, -1)

    def gelu(self, x_MxK: jax.Array) -> jax.Array:
        """GELU_tanh(self(x)) as one operation (`ops.dense_gelu`)."""
        return self.ops.dense_gelu(x_MxK, self.kernel[...], self.bias[...], self.dtype)


# ---- normalisation / modulation ------------------------------------------------------------------
class RMSNorm(nnx.Module):
    """RMSNorm with a learned scale (used on per-head queries/keys)."""

    def __init__(self, dim: int, ops: Ops, eps: float = NORM_EPS):
        self.ops, self.eps = ops, eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.ops.rms_norm(x, self.scale[...], self.eps)


class Modulation(nnx.Module):
    """SiLU -> Linear(D, n*D), zero-initialised (adaLN-Zero: a new block is the identity)."""

    def __init__(self, hidden: int, n: int, dtype: Dtype, ops: Ops, rngs: nnx.Rngs):
        self.n = n
        self.linear = Dense(hidden, n * hidden, dtype, ops, rngs, init=_zeros)

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

    def __init__(self, in_dim: int, hidden: int, dtype: Dtype, ops: Ops, rngs: nnx.Rngs, init=_xavier):
        self.fc1 = Dense(in_dim, hidden, dtype, ops, rngs, init=init)
        self.fc2 = Dense(hidden, hidden, dtype, ops, rngs, init=init)

    def __call__(self, v_BxI: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(v_BxI))).astype(jnp.float32)


def remat_call(block: nnx.Module, *args):
    """block(*args), recomputed in the backward pass instead of stored. A pure jax.checkpoint over
    the block's split state, so it composes with every transform around it: nnx.remat writes the
    block's Variables back from inside its own trace, which a jax.jvp around it (MeanFlow) rejects."""
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


class TimestepEmbedder(nnx.Module):
    """t in [0, 1] -> sinusoid of time_scale*t -> MLP -> (B, D) float32."""

    def __init__(self, hidden: int, dtype: Dtype, ops: Ops, rngs: nnx.Rngs, time_scale: float = TIME_SCALE):
        self.time_scale = time_scale
        # DiT initialises the timestep MLP with N(0, 0.02).
        self.mlp = MlpEmbedder(TIME_FREQ_DIM, hidden, dtype, ops, rngs, init=_normal002)

    def __call__(self, t_B: jax.Array) -> jax.Array:
        return self.mlp(timestep_sinusoid(t_B.astype(jnp.float32) * self.time_scale))


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

    def __init__(self, in_channels: int, patch: int, hidden: int, stem: str, dtype: Dtype, ops: Ops, rngs: nnx.Rngs):
        self.patch, self.dtype = patch, dtype
        if stem == "conv":
            width = hidden // 4
            self.stem_conv = nnx.Conv(in_channels, width, (3, 3), padding="SAME", dtype=dtype, rngs=rngs)
            self.stem_norm = nnx.GroupNorm(width, num_groups=_largest_group_count(width), epsilon=NORM_EPS, rngs=rngs)
            in_channels = width
        else:
            self.stem_conv = self.stem_norm = None
        self.proj = Dense(patch * patch * in_channels, hidden, dtype, ops, rngs)

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


def sincos_pos_embed_2d(dim: int, grid: int, offset: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Fixed 2D sin-cos table (grid*grid, dim) as in DiT/MAE (float64 maths, float32 out).

    Token (i, j) (row i, column j) gets [sincos_{dim/2}(p(j)), sincos_{dim/2}(p(i))], each [sin, cos],
    at positions p(i) = (offset + i) * scale: DiT's table with (0, 1), a centre crop of SD3's larger,
    rescaled one otherwise."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    pos = (offset + np.arange(grid, dtype=np.float64)) * scale
    cols, rows = np.meshgrid(pos, pos)

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def make_pos_embed(kind: str, grid: int, hidden: int, rngs: nnx.Rngs, offset: float = 0.0, scale: float = 1.0):
    if kind == "sincos":
        return FixedEmbedding(jnp.asarray(sincos_pos_embed_2d(hidden, grid, offset, scale)))
    return nnx.Param(_normal002(rngs.params(), (grid * grid, hidden), jnp.float32))


def unpatchify(x_BxLxK: jax.Array, patch: int, channels: int) -> jax.Array:
    """(B, h*w, p*p*C) -> (B, h*p, w*p, C); inverse of PatchEmbed's (ph, pw, c) ordering."""
    B, L, _ = x_BxLxK.shape
    g = math.isqrt(L)
    x = x_BxLxK.reshape(B, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, g * patch, g * patch, channels)


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) + Linear to p*p*C_out; both zero-initialised so a new model outputs 0."""

    def __init__(self, hidden: int, patch: int, out_channels: int, dtype: Dtype, ops: Ops, rngs: nnx.Rngs):
        self.dtype, self.ops = dtype, ops
        self.modulation = Modulation(hidden, 2, dtype, ops, rngs)
        self.linear = Dense(hidden, patch * patch * out_channels, dtype, ops, rngs, init=_zeros)

    def __call__(self, x_BxLxD: jax.Array, c_BxD: jax.Array) -> jax.Array:
        B, L, D = x_BxLxD.shape
        shift, scale = self.modulation(c_BxD)
        h = self.ops.ln_modulate(x_BxLxD, shift, scale, self.dtype, NORM_EPS).reshape(B * L, D)
        return self.linear(h).astype(jnp.float32).reshape(B, L, -1)


# ---- MLP -----------------------------------------------------------------------------------------
class Mlp(nnx.Module):
    """Token MLP on flattened (N, D) inputs. "gelu": Linear-GELU(tanh)-Linear (DiT/SD3).
    "swiglu": one fused Linear to [gate | value], silu(gate) * value, Linear; hidden is 2/3 of the
    GELU width (rounded up to a multiple of 8) so both variants have about the same parameters."""

    def __init__(self, hidden: int, ratio: float, kind: str, dtype: Dtype, ops: Ops, rngs: nnx.Rngs):
        self.kind = kind
        inner = int(hidden * ratio)
        if kind == "swiglu":
            inner = -(-int(inner * 2 / 3) // 8) * 8
            self.fc1 = Dense(hidden, 2 * inner, dtype, ops, rngs)
        else:
            self.fc1 = Dense(hidden, inner, dtype, ops, rngs)
        self.fc2 = Dense(inner, hidden, dtype, ops, rngs)

    def __call__(self, h_NxD: jax.Array) -> jax.Array:
        if self.kind == "swiglu":
            gate, value = jnp.split(self.fc1(h_NxD), 2, axis=-1)
            return self.fc2(jax.nn.silu(gate) * value)
        return self.fc2(self.fc1.gelu(h_NxD))
