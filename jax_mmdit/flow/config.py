"""Configs for Rectified Flow training (FlowConfig) and sampling (SamplerConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from jax_mmdit.errors import UserError

TimestepSampling = Literal["uniform", "logit_normal", "mode"]
SamplerMethod = Literal["euler", "heun"]
TIMESTEP_SAMPLINGS = get_args(TimestepSampling)
SAMPLER_METHODS = get_args(SamplerMethod)

# Mode sampling's density stays positive (the map u -> t monotone) only for -1 <= s <= 2/(pi-2)
# (SD3 paper, Sec. 3.1).
MODE_SCALE_MIN = -1.0
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)


def _check_shift(shift: float) -> None:
    if not (math.isfinite(shift) and shift > 0):
        raise UserError(f"shift must be a finite number > 0 (1.0 = no shift), got {shift}.")


@dataclass(frozen=True)
class FlowConfig:
    """How training picks t, and how labels are dropped for classifier-free guidance."""

    # Which t the model sees most: SD3 found logit-normal(0, 1) best among the schedules it tried.
    timestep_sampling: TimestepSampling = "logit_normal"
    # Location of logit(t); > 0 puts more training on noisier t.
    logit_mean: float = 0.0
    # Spread of logit(t); larger puts more weight on the ends of [0, 1].
    logit_std: float = 1.0
    # Mode sampling's s: 0 is uniform, > 0 favours the middle of [0, 1] (SD3's best was 1.29).
    mode_scale: float = 1.29
    # Resolution time shift t' = s*t / (1 + (s-1)*t): larger images keep more signal at a given t,
    # so they need noisier t (see `shift_for_resolution`). 1.0 = no shift.
    shift: float = 1.0
    # Fraction of labels replaced by the null class so one model learns both passes of CFG.
    label_dropout: float = 0.1
    # Number of equal bins of t in [0, 1] for the per-t loss logged in aux.
    num_loss_bins: int = 10

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise UserError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}.")
        if not math.isfinite(self.logit_mean):
            raise UserError(f"logit_mean must be finite, got {self.logit_mean}.")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0):
            raise UserError(f"logit_std must be a finite number > 0, got {self.logit_std}.")
        if not MODE_SCALE_MIN <= self.mode_scale <= MODE_SCALE_MAX:
            raise UserError(
                f"mode_scale must lie in [{MODE_SCALE_MIN}, {MODE_SCALE_MAX:.4f}] for mode sampling to be "
                f"a valid density, got {self.mode_scale}."
            )
        _check_shift(self.shift)
        if not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"label_dropout must lie in [0, 1), got {self.label_dropout}.")
        if isinstance(self.num_loss_bins, bool) or not isinstance(self.num_loss_bins, int) or self.num_loss_bins < 1:
            raise UserError(f"num_loss_bins must be an int >= 1, got {self.num_loss_bins!r}.")


@dataclass(frozen=True)
class SamplerConfig:
    """How to integrate the learned ODE from noise (t=1) to data (t=0)."""

    # "euler": 1 model call per step; "heun": 2nd order, 2 calls per step (one fewer in total).
    method: SamplerMethod = "euler"
    # Number of steps of the 1 -> 0 time grid.
    num_steps: int = 50
    # Classifier-free guidance scale: 1.0 is the plain conditional model (one forward pass per call).
    cfg_scale: float = 1.0
    # Apply guidance only while lo <= t <= hi (Kynkaanniemi et al. 2024); None = all t.
    cfg_interval: tuple[float, float] | None = None
    # Same resolution time shift as FlowConfig.shift, applied to the time grid. 1.0 = none.
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in SAMPLER_METHODS:
            raise UserError(f"method must be one of {SAMPLER_METHODS}, got {self.method!r}.")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise UserError(f"num_steps must be an int >= 1, got {self.num_steps!r}.")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise UserError(f"cfg_scale must be a finite number >= 0 (1.0 = no guidance), got {self.cfg_scale}.")
        if self.cfg_interval is not None:
            interval = self.cfg_interval
            if not (isinstance(interval, (tuple, list)) and len(interval) == 2):
                raise UserError(f"cfg_interval must be None or a pair (lo, hi), got {interval!r}.")
            lo, hi = float(interval[0]), float(interval[1])
            if not 0.0 <= lo <= hi <= 1.0:
                raise UserError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {interval!r}.")
            # A tuple keeps the config hashable: it is a static argument of the jitted sampler.
            object.__setattr__(self, "cfg_interval", (lo, hi))
        _check_shift(self.shift)
