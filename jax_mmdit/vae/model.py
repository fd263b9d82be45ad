"""`AutoencoderKL` in Flax NNX, channels last: the VAE of latent diffusion (SD 1.x/2.x, SDXL, SD3, Flux).

The same network as diffusers' `AutoencoderKL` (its submodules carry diffusers' names, so loading
published weights is a rename and a transpose, `vae/weights.py`): an encoder of ResNet blocks with
stride-2 downsampling and a self-attention middle block, a diagonal Gaussian posterior over the
latents (mean, log-variance), and a mirrored decoder with nearest-neighbour upsampling. Arrays in,
arrays out: images are (B, H, W, C) in [-1, 1], latents (B, H/f, W/f, latent_channels) before any
scaling (`VAEConfig.scaling_factor` is applied by whoever feeds a diffusion model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mmdit.ops import Ops
from jax_mmdit.ops.reference import ReferenceOps
from jax_mmdit.vae.config import VAEConfig

EPS = 1e-6  # diffusers' resnet_eps and the attention GroupNorm's eps in every AutoencoderKL
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's clamp, as diffusers' DiagonalGaussianDistribution


def _conv(cin: int, cout: int, k: int, dtype, rngs: nnx.Rngs, stride: int = 1, padding=None) -> nnx.Conv:
    pad = k // 2 if padding is None else padding
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=pad, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _norm(c: int, groups: int, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    # Exact two-pass variance: E[x^2] - E[x]^2 loses digits on large activations.
    return nnx.GroupNorm(
        c, num_groups=groups, epsilon=EPS, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, rngs=rngs
    )


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int, dtype, rngs: nnx.Rngs):
        self.norm1 = _norm(cin, groups, dtype, rngs)
        self.conv1 = _conv(cin, cout, 3, dtype, rngs)
        self.norm2 = _norm(cout, groups, dtype, rngs)
        self.conv2 = _conv(cout, cout, 3, dtype, rngs)
        self.conv_shortcut = _conv(cin, cout, 1, dtype, rngs) if cin != cout else None

    def __call__(self, x_BxHxWxC):
        h = self.conv1(jax.nn.silu(self.norm1(x_BxHxWxC)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x_BxHxWxC if self.conv_shortcut is None else self.conv_shortcut(x_BxHxWxC)
        return skip + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all H*W positions, with a residual (the VAE's middle block)."""

    def __init__(self, c: int, groups: int, dtype, ops: Ops, rngs: nnx.Rngs):
        self.ops = ops
        self.group_norm = _norm(c, groups, dtype, rngs)
        lin = lambda: nnx.Linear(c, c, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)  # noqa: E731
        self.to_q, self.to_k, self.to_v = lin(), lin(), lin()
        self.to_out = nnx.List([lin()])  # diffusers' [Linear, Dropout]: only the Linear has weights

    def __call__(self, x_BxHxWxC):
        B, H, W, C = x_BxHxWxC.shape
        h_BxLxC = self.group_norm(x_BxHxWxC).reshape(B, H * W, C)
        q, k, v = (f(h_BxLxC).reshape(B, H * W, 1, C) for f in (self.to_q, self.to_k, self.to_v))
        o_BxLxC = self.to_out[0](self.ops.attention(q, k, v))
        return x_BxHxWxC + o_BxLxC.reshape(B, H, W, C).astype(x_BxHxWxC.dtype)


class MidBlock(nnx.Module):
    def __init__(self, c: int, groups: int, attention: bool, dtype, ops: Ops, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(c, c, groups, dtype, rngs) for _ in range(2)])
        self.attentions = nnx.List([AttnBlock(c, groups, dtype, ops, rngs)]) if attention else None

    def __call__(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    def __init__(self, c: int, dtype, rngs: nnx.Rngs):
        # diffusers pads right/bottom by one, then a valid stride-2 conv.
        self.conv = _conv(c, c, 3, dtype, rngs, stride=2, padding=((0, 1), (0, 1)))

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    def __init__(self, c: int, dtype, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, dtype, rngs)

    def __call__(self, x_BxHxWxC):
        x = jnp.repeat(jnp.repeat(x_BxHxWxC, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
        return self.conv(x)


class Level(nnx.Module):
    """One resolution level: ResNet blocks, then an optional down- or upsampler."""

    def __init__(self, cin, cout, n, groups, resample, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, dtype, rngs) for i in range(n)])
        self.downsamplers = nnx.List([Downsample(cout, dtype, rngs)]) if resample == "down" else None
        self.upsamplers = nnx.List([Upsample(cout, dtype, rngs)]) if resample == "up" else None

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for s in self.downsamplers or self.upsamplers or ():
            x = s(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, dtype, ops: Ops, rngs: nnx.Rngs):
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, dtype, rngs)
        self.down_blocks = nnx.List(
            [
                Level(ch[max(i - 1, 0)], c, cfg.layers_per_block, g, "down" if i < len(ch) - 1 else None, dtype, rngs)
                for i, c in enumerate(ch)
            ]
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention, dtype, ops, rngs)
        self.conv_norm_out = _norm(ch[-1], g, dtype, rngs)
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, dtype, rngs)

    def __call__(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, dtype, ops: Ops, rngs: nnx.Rngs):
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = _conv(cfg.latent_channels, ch[0], 3, dtype, rngs)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention, dtype, ops, rngs)
        self.up_blocks = nnx.List(
            [
                Level(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, "up" if i < len(ch) - 1 else None, dtype, rngs)
                for i, c in enumerate(ch)
            ]
        )
        self.conv_norm_out = _norm(ch[-1], g, dtype, rngs)
        self.conv_out = _conv(ch[-1], cfg.out_channels, 3, dtype, rngs)

    def __call__(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """`encode(x) -> (mean, logvar)`, `decode(z) -> x`; `__call__` reconstructs through a posterior
    sample (or its mean when no `rng` is given). Parameters float32, compute in `dtype`."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, ops: Ops | None = None):
        self.cfg, self.dtype = cfg, dtype
        ops = ReferenceOps() if ops is None else ops
        self.encoder = Encoder(cfg, dtype, ops, rngs)
        self.decoder = Decoder(cfg, dtype, ops, rngs)
        m = 2 * cfg.latent_channels
        self.quant_conv = _conv(m, m, 1, dtype, rngs) if cfg.use_quant_conv else None
        c = cfg.latent_channels
        self.post_quant_conv = _conv(c, c, 1, dtype, rngs) if cfg.use_post_quant_conv else None

    def encode(self, x_BxHxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images in [-1, 1] -> the posterior's mean and log-variance, float32 (B, h, w, latent_channels)."""
        moments = self.encoder(x_BxHxWxC.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z_Bxhxwxc: jax.Array) -> jax.Array:
        """Raw latents (unscaled) -> images, roughly in [-1, 1], float32."""
        z = z_Bxhxwxc.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x_BxHxWxC: jax.Array, rng: jax.Array | None = None):
        """-> (reconstruction, mean, logvar)."""
        mean, logvar = self.encode(x_BxHxWxC)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return self.decode(z), mean, logvar
