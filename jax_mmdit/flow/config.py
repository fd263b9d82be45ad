"""Configs for training (FlowConfig: the objective and how it picks t) and sampling (SamplerConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from jax_mmdit.errors import UserError

TimestepSampling = Literal["uniform", "logit_normal", "mode"]
SamplerMethod = Literal["euler", "heun", "ddpm", "ddim", "meanflow"]
# "rectified_flow": ours, x_t = (1 - t) x + t eps, the model predicts eps - x at t (t = 1 is noise).
# "sit": SiT's linear interpolant, the same path in reversed time: the model sees 1 - t and predicts
#   x - eps (published SiT weights). "ddpm": DiT's objective, eps prediction (+ learned variance with
#   learn_sigma) under a discrete-time DDPM schedule (published DiT weights). "meanflow": the
#   rectified-flow path, the model predicts the average velocity u(z_t, r, t) over [r, t] (Geng et al.
#   2025; `jax_mmdit.flow.meanflow`): one jump z_r = z_t - (t - r) u samples in one step.
Objective = Literal["rectified_flow", "sit", "ddpm", "meanflow"]
TIMESTEP_SAMPLINGS = get_args(TimestepSampling)
SAMPLER_METHODS = get_args(SamplerMethod)
OBJECTIVES = get_args(Objective)
# Which samplers integrate which objective: the ODE samplers need a velocity, ddpm/ddim an eps model,
# "meanflow" (average-velocity jumps) a meanflow model, whose velocity at r = t also drives euler/heun.
FLOW_METHODS = ("euler", "heun")
DDPM_METHODS = ("ddpm", "ddim")
MEANFLOW_METHODS = ("meanflow",)

# Mode sampling's density stays positive (the map u -> t monotone) only for -1 <= s <= 2/(pi-2)
# (SD3 paper, Sec. 3.1).
MODE_SCALE_MIN = -1.0
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)


def _check_shift(shift: float) -> None:
    if not (math.isfinite(shift) and shift > 0):
        raise UserError(f"shift must be a finite number > 0 (1.0 = no shift), got {shift}.")


@dataclass(frozen=True)
class MeanFlowConfig:
    """The meanflow objective's knobs (Geng et al. 2025, their defaults); used by no other objective."""

    # Fraction of the batch trained with r = t, i.e. on the plain instantaneous velocity (paper: 75 %).
    # t and r are two draws of flow.timestep_sampling, ordered so that r <= t.
    equal_fraction: float = 0.75
    # Guidance folded into training: the target's velocity is omega*v + kappa*v_cond + (1-omega-kappa)*v_uncond,
    # the last two the model's own (r = t) predictions, so one-step samples come out guided with an
    # effective CFG scale omega / (1 - kappa). omega 1, kappa 0: no guidance.
    omega: float = 1.0
    kappa: float = 0.0
    # Guide only targets with lo <= t <= hi (their "t_start, t_end").
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # Adaptive loss weight 1 / (||u - u_tgt||^2 + norm_eps)^norm_p per sample (squared error summed
    # over pixels); 0 = the plain squared error.
    norm_p: float = 1.0
    norm_eps: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.equal_fraction <= 1.0:
            raise UserError(f"meanflow.equal_fraction must lie in [0, 1], got {self.equal_fraction}.")
        if not (math.isfinite(self.omega) and math.isfinite(self.kappa) and self.omega > 0 and 0 <= self.kappa < 1):
            raise UserError(f"meanflow needs omega > 0 and 0 <= kappa < 1, got {self.omega} and {self.kappa}.")
        lo, hi = (float(v) for v in self.guidance_interval)
        if not 0.0 <= lo <= hi <= 1.0:
            raise UserError(f"meanflow.guidance_interval needs 0 <= lo <= hi <= 1, got {self.guidance_interval}.")
        object.__setattr__(self, "guidance_interval", (lo, hi))
        if not (self.norm_p >= 0 and self.norm_eps > 0):
            raise UserError(f"meanflow needs norm_p >= 0 and norm_eps > 0, got {self.norm_p} and {self.norm_eps}.")

    @property
    def guided(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0


@dataclass(frozen=True)
class FlowConfig:
    """The training objective, how it picks t, and how labels are dropped for classifier-free guidance."""

    # What the model predicts and along which path (see `Objective` above); a converted checkpoint
    # carries the one it was trained with.
    objective: Objective = "rectified_flow"
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
    # ddpm only: discrete timesteps T and the linear beta schedule (DiT: 1000, 1e-4 .. 0.02). A
    # training t in [0, 1] (drawn as above; "uniform" is DiT's) becomes timestep floor(t * T).
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # meanflow only (left at its defaults otherwise).
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.objective != "meanflow" and self.meanflow != MeanFlowConfig():
            raise UserError(f"flow.meanflow.* configures the meanflow objective; the objective is {self.objective!r}.")
        T = self.num_train_timesteps
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise UserError(f"num_train_timesteps must be an int >= 2, got {T!r}.")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise UserError(f"Need 0 < beta_start < beta_end < 1, got {self.beta_start} and {self.beta_end}.")
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
    """How to go from noise (t=1) to data (t=0)."""

    # Flow objectives: "euler" (1 model call per step) or "heun" (2nd order, 2 calls per step) on the
    # ODE. ddpm: "ddpm" (ancestral, with the learned variance) or "ddim" (deterministic, eta 0), on
    # num_steps of the T training timesteps, evenly spaced as DiT respaces them. meanflow: "meanflow",
    # num_steps jumps z_r = z_t - (t - r) u(z_t, r, t) along the time grid (1 step: noise to image).
    method: SamplerMethod = "euler"
    # Number of steps of the 1 -> 0 time grid.
    num_steps: int = 50
    # Classifier-free guidance scale: 1.0 is the plain conditional model (one forward pass per call).
    cfg_scale: float = 1.0
    # Apply guidance only while lo <= t <= hi (Kynkaanniemi et al. 2024); None = all t.
    cfg_interval: tuple[float, float] | None = None
    # Same resolution time shift as FlowConfig.shift, applied to the time grid. 1.0 = none.
    shift: float = 1.0
    # Guide only the first k channels of the prediction (the rest: conditional). None = all of
    # them, the standard; DiT's and SiT's reported FIDs used 3 (of 4 latent channels).
    cfg_channels: int | None = None

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
        if self.cfg_channels is not None and (isinstance(self.cfg_channels, bool) or self.cfg_channels < 1):
            raise UserError(f"cfg_channels must be None (all) or an int >= 1, got {self.cfg_channels!r}.")
        if self.method in DDPM_METHODS and self.num_steps < 2:
            raise UserError(f"{self.method!r} sampling needs num_steps >= 2, got {self.num_steps}.")
        if self.method in DDPM_METHODS and self.shift != 1.0:
            raise UserError(f"shift is a flow-sampler option; {self.method!r} steps the DDPM schedule (use 1.0).")


def check_sampler_fits(flow: FlowConfig, sampler: SamplerConfig) -> None:
    """The sampler must integrate what the objective's model predicts."""
    ddpm = flow.objective == "ddpm"
    if ddpm and sampler.method not in DDPM_METHODS:
        raise UserError(
            f"sampler.method {sampler.method!r} integrates a velocity; a ddpm model samples with 'ddpm' or 'ddim'."
        )
    if not ddpm and sampler.method in DDPM_METHODS:
        raise UserError(
            f"sampler.method {sampler.method!r} needs objective 'ddpm'; the {flow.objective!r} objective samples "
            "with 'euler' or 'heun'."
        )
    if sampler.method in MEANFLOW_METHODS and flow.objective != "meanflow":
        raise UserError(
            f"sampler.method 'meanflow' jumps with an average velocity; the {flow.objective!r} objective's model "
            "predicts an instantaneous one (use 'euler' or 'heun')."
        )
