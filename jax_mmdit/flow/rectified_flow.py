"""Rectified Flow training: interpolation, timestep sampling, label dropout and the loss.

Convention (SD3 / minRF): x_t = (1 - t) * x + t * eps, so t = 0 is data and t = 1 is pure noise.
The model predicts the velocity dx_t/dt = eps - x; sampling integrates it from t = 1 down to 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jax_mmdit.flow.config import FlowConfig

# Each random choice of a training step has its own stream, derived by fold_in from the step's key.
# Fixed ids keep one choice's randomness unchanged when another is switched on or off
# (e.g. the noise is the same with or without label dropout).
STREAM_T = 0
STREAM_NOISE = 1
STREAM_LABEL_DROP = 2

LossFn = Callable[[Any, jax.Array, jax.Array | None, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def time_shift(t: jax.Array | float, shift: float) -> jax.Array | float:
    """SD3's resolution shift t' = s*t / (1 + (s-1)*t): fixes 0 and 1, s > 1 moves t towards noise."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def shift_for_resolution(height: int, width: int, base_height: int = 256, base_width: int = 256) -> float:
    """SD3's shift sqrt(m / n) for m = height*width against a base of n = base_height*base_width.

    Sizes can be in pixels or latent cells, as long as both use the same unit. SD3 derived this
    from the signal-to-noise ratio but finally chose shift 3.0 for 1024^2 by preference (Sec. 5.3.2),
    where this formula gives 4.0 from a 256^2 base: treat it as a starting point.
    """
    sizes = (height, width, base_height, base_width)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(f"height, width, base_height and base_width must be ints >= 1, got {sizes}.")
    return math.sqrt((height * width) / (base_height * base_width))


def expand_like(t_B: jax.Array, x: jax.Array) -> jax.Array:
    return t_B.reshape(t_B.shape + (1,) * (x.ndim - t_B.ndim))


def interpolate(x_BxHxWxC: jax.Array, noise_BxHxWxC: jax.Array, t_B: jax.Array) -> jax.Array:
    """x_t = (1 - t) * x + t * eps (t = 1 is pure noise)."""
    t = expand_like(t_B, x_BxHxWxC)
    return (1.0 - t) * x_BxHxWxC + t * noise_BxHxWxC


def velocity_target(x_BxHxWxC: jax.Array, noise_BxHxWxC: jax.Array) -> jax.Array:
    """d x_t / dt = eps - x: what the model learns to predict."""
    return noise_BxHxWxC - x_BxHxWxC


def sample_timesteps(rng: jax.Array, batch_size: int, cfg: FlowConfig) -> jax.Array:
    """Draws f32[batch_size] training times in [0, 1] from cfg's schedule, then applies cfg.shift."""
    if cfg.timestep_sampling == "uniform":
        t_B = jax.random.uniform(rng, (batch_size,), jnp.float32)
    elif cfg.timestep_sampling == "logit_normal":
        logit_B = cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, (batch_size,), jnp.float32)
        t_B = jax.nn.sigmoid(logit_B)
    elif cfg.timestep_sampling == "mode":
        # SD3 eq. (20), with t = 1 as noise: s = 0 gives t = 1 - u, i.e. uniform.
        u_B = jax.random.uniform(rng, (batch_size,), jnp.float32)
        t_B = 1.0 - u_B - cfg.mode_scale * (jnp.cos(0.5 * jnp.pi * u_B) ** 2 - 1.0 + u_B)
    else:  # FlowConfig already rejects this; kept so a new name cannot fall through silently.
        raise ValueError(f"unknown timestep_sampling {cfg.timestep_sampling!r}.")
    # Rounding in the mode formula can step a hair outside [0, 1].
    return time_shift(jnp.clip(t_B, 0.0, 1.0), cfg.shift)


def drop_labels(rng: jax.Array, y_B: jax.Array, prob: float, null_class: int) -> jax.Array:
    """Replaces each label by null_class with probability prob (trains the unconditional CFG branch)."""
    if prob == 0.0:
        return y_B
    drop_B = jax.random.bernoulli(rng, prob, y_B.shape)
    return jnp.where(drop_B, jnp.asarray(null_class, y_B.dtype), y_B)


def drop_condition(rng: jax.Array, cond: dict, prob: float, null_cond: dict) -> dict:
    """Text conditions: each sample's condition (context, mask, pooled) becomes the empty prompt's,
    `null_cond` (batch 1), with probability prob (SD3's caption dropout, for CFG)."""
    if prob == 0.0:
        return cond
    B = next(iter(cond.values())).shape[0]
    drop_B = jax.random.bernoulli(rng, prob, (B,))
    return {k: jnp.where(expand_like(drop_B, v), null_cond[k].astype(v.dtype), v) if k in null_cond else v
            for k, v in cond.items()}  # fmt: skip


def drop_condition_or_label(rng: jax.Array, y, prob: float, null_class: int | None, null_cond: dict | None):
    """The training condition after dropout (on its own stream): a dict with `null_cond`, labels of
    a conditional model with its null class; else unchanged."""
    rng = jax.random.fold_in(rng, STREAM_LABEL_DROP)
    if isinstance(y, dict):
        return y if null_cond is None else drop_condition(rng, y, prob, null_cond)
    if is_conditional(null_class) and y is not None:
        return drop_labels(rng, y, prob, null_class)
    return y


def call_model(model: Callable) -> Callable:
    """`model` as f(x, t_B, y): y is a label array, or (text) a dict of the model's keyword inputs."""
    return lambda x, t_B, y: model(x, t_B, **y) if isinstance(y, dict) else model(x, t_B, y)


def is_conditional(null_class: int | None) -> bool:
    """Does a model with this null class (== num_classes) take labels? 0 and None: unconditional."""
    return null_class is not None and null_class > 0


def loss_bins(t_B: jax.Array, loss_B: jax.Array, num_bins: int) -> dict[str, jax.Array]:
    """Per-sample losses summed (and counted) in equal bins of t in [0, 1]: the loss's aux."""
    bin_B = jnp.clip(jnp.floor(t_B * num_bins).astype(jnp.int32), 0, num_bins - 1)
    return {
        "loss_bin_sum": jnp.zeros((num_bins,), jnp.float32).at[bin_B].add(jax.lax.stop_gradient(loss_B)),
        "loss_bin_count": jnp.zeros((num_bins,), jnp.float32).at[bin_B].add(1.0),
    }


def sit_model(model: Callable) -> Callable:
    """A model trained with SiT's convention (time 1 - t, predicting x - eps) as one of ours."""
    return lambda x, t_B, y_B: -model(x, 1.0 - t_B, y_B)


def make_loss_fn(flow_cfg: FlowConfig, null_class: int | None, null_cond: dict | None = None) -> LossFn:
    """Returns loss_fn(model, x_BxHxWxC, y_B, rng) -> (loss, aux) for nnx.value_and_grad(has_aux=True).

    `model(x_t, t_B, y_B)` is any callable returning f32[B, H, W, C'] with C' >= C (with learn_sigma
    C' = 2C and only the first C channels are the velocity). The loss is the batch mean of the
    per-sample MSE, computed in fp32. aux holds, per equal-width bin of t, the sum of per-sample MSEs
    (`loss_bin_sum`) and the number of samples (`loss_bin_count`), both f32[num_loss_bins], so
    they can be summed over steps and devices before dividing.

    The objective is flow_cfg.objective's: "sit" is this loss through `sit_model`, "ddpm" DiT's
    (`jax_mmdit.flow.ddpm.make_loss_fn`), "meanflow" `jax_mmdit.flow.meanflow.make_loss_fn`. A text
    model's `y` is a dict of its keyword inputs; `null_cond` (the empty prompt's) replaces it with
    probability label_dropout.
    """
    if null_class is not None and (isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 0):
        raise ValueError(f"null_class must be None or an int >= 0 (== num_classes), got {null_class!r}.")
    if flow_cfg.objective == "ddpm":
        from jax_mmdit.flow import ddpm  # ddpm builds on this module

        return ddpm.make_loss_fn(flow_cfg, null_class, null_cond)
    if flow_cfg.objective == "meanflow":
        from jax_mmdit.flow import meanflow  # meanflow builds on this module

        return meanflow.make_loss_fn(flow_cfg, null_class, null_cond)
    sit = flow_cfg.objective == "sit"

    def loss_fn(model: Any, x_BxHxWxC: jax.Array, y_B: jax.Array | None, rng: jax.Array):
        if x_BxHxWxC.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C], got shape {x_BxHxWxC.shape}.")
        B, C = x_BxHxWxC.shape[0], x_BxHxWxC.shape[-1]
        x_BxHxWxC = x_BxHxWxC.astype(jnp.float32)
        t_B = sample_timesteps(jax.random.fold_in(rng, STREAM_T), B, flow_cfg)
        noise_BxHxWxC = jax.random.normal(jax.random.fold_in(rng, STREAM_NOISE), x_BxHxWxC.shape, jnp.float32)
        y_B = drop_condition_or_label(rng, y_B, flow_cfg.label_dropout, null_class, null_cond)

        xt_BxHxWxC = interpolate(x_BxHxWxC, noise_BxHxWxC, t_B)
        f = call_model(model)
        out = (sit_model(f) if sit else f)(xt_BxHxWxC, t_B, y_B)
        if out.shape[:-1] != x_BxHxWxC.shape[:-1] or out.shape[-1] < C:
            raise ValueError(
                f"model output shape {out.shape} must match input {x_BxHxWxC.shape} with at least {C} channels."
            )
        v_BxHxWxC = out[..., :C].astype(jnp.float32)
        err = v_BxHxWxC - velocity_target(x_BxHxWxC, noise_BxHxWxC)
        mse_B = jnp.mean(jnp.square(err), axis=(1, 2, 3))
        return jnp.mean(mse_B), loss_bins(t_B, mse_B, flow_cfg.num_loss_bins)

    return loss_fn
