"""Rectified Flow: training loss (make_loss_fn) and ODE samplers (sample, sample_loop)."""
from jax_mmdit.flow.config import FlowConfig, SamplerConfig
from jax_mmdit.flow.rectified_flow import (
    STREAM_LABEL_DROP,
    STREAM_NOISE,
    STREAM_T,
    drop_labels,
    interpolate,
    make_loss_fn,
    sample_timesteps,
    shift_for_resolution,
    time_shift,
    velocity_target,
)
from jax_mmdit.flow.samplers import sample, sample_loop, time_grid

__all__ = [
    "FlowConfig",
    "SamplerConfig",
    "STREAM_LABEL_DROP",
    "STREAM_NOISE",
    "STREAM_T",
    "drop_labels",
    "interpolate",
    "make_loss_fn",
    "sample",
    "sample_loop",
    "sample_timesteps",
    "shift_for_resolution",
    "time_grid",
    "time_shift",
    "velocity_target",
]
