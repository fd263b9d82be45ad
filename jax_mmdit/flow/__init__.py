"""The training objectives and their samplers: rectified flow (ours and SiT's convention) with ODE
samplers, and DiT's DDPM (`jax_mmdit.flow.ddpm`) with DDPM/DDIM samplers.

    loss_fn = make_loss_fn(FlowConfig(), null_class=num_classes)   # None/0: no label dropout
    loss, aux = loss_fn(model, x_BxHxWxC, y_B, rng)   # aux: per-t-bin sums and counts of the MSE
    x0 = sample(model, noise_BxHxWxC, y_B, SamplerConfig(num_steps=50, cfg_scale=4.0))
    x0 = sample(dit, noise, y, SamplerConfig(method="ddpm", num_steps=250), flow=FlowConfig(objective="ddpm"), rng=key)
    x0 = sample_loop(velocity_fn, noise, y, sampler_cfg, null_class=...)   # any v(x, t_B, y_B); jit it

x_t = (1 - t) x + t eps, t = 1 is noise; the model predicts eps - x. Each random choice of a step
(t, noise, label dropout) has its own stream (`STREAM_*`, folded into the step's key). Samplers
integrate in float32 in one `lax.scan`; CFG is one batched forward of both branches.
"""

from jax_mmdit.flow.config import FlowConfig, SamplerConfig, check_sampler_fits
from jax_mmdit.flow.rectified_flow import (
    STREAM_LABEL_DROP,
    STREAM_NOISE,
    STREAM_T,
    drop_labels,
    interpolate,
    make_loss_fn,
    sample_timesteps,
    shift_for_resolution,
    sit_model,
    time_shift,
    velocity_target,
)
from jax_mmdit.flow.samplers import guided_model, sample, sample_loop, time_grid

__all__ = [
    "FlowConfig",
    "SamplerConfig",
    "STREAM_LABEL_DROP",
    "STREAM_NOISE",
    "STREAM_T",
    "check_sampler_fits",
    "drop_labels",
    "guided_model",
    "interpolate",
    "make_loss_fn",
    "sample",
    "sample_loop",
    "sample_timesteps",
    "shift_for_resolution",
    "sit_model",
    "time_grid",
    "time_shift",
    "velocity_target",
]
