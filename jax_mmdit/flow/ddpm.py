"""DiT's objective: a discrete-time DDPM (Ho et al. 2020) with eps prediction and, with learn_sigma,
a learned variance (Nichol & Dhariwal 2021), so published DiT weights train and sample as they were
made. The model is called with t = timestep / T (its embedder scales by time_scale = 1000, so
T = 1000 gives DiT's integer timesteps exactly).

- Loss: eps MSE plus, with learned variance, the variational bound term of that timestep (KL of the
  true posterior q(x_{t-1} | x_t, x_0) to the model's, with the mean's gradient stopped so the bound
  trains only the variance; the discretised decoder likelihood at t = 0): DiT's "hybrid" loss.
- Samplers on num_steps of the T timesteps, evenly spaced as DiT respaces them: "ddpm" (ancestral,
  the learned variance interpolating log beta and log posterior variance) and "ddim" (eta 0).
  Guidance mixes eps; the variance comes from the conditional pass, as in DiT's forward_with_cfg.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_mmdit.flow.config import FlowConfig, SamplerConfig
from jax_mmdit.flow.rectified_flow import (
    STREAM_NOISE,
    STREAM_T,
    call_model,
    drop_condition_or_label,
    loss_bins,
    sample_timesteps,
)

ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def alphas_cumprod(cfg: FlowConfig) -> np.ndarray:
    """float64[T] cumulative products of 1 - beta for the linear schedule (DiT's, diffusers' "linear")."""
    betas = np.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def respaced_timesteps(num_train: int, num_steps: int) -> np.ndarray:
    """int[num_steps] ascending timesteps of the T training ones, evenly spaced with DiT's rounding
    (`space_timesteps(T, [num_steps])`: 0 and T - 1 always included)."""
    if not 2 <= num_steps <= num_train:
        raise ValueError(f"num_steps must lie in [2, {num_train}], got {num_steps}.")
    stride = (num_train - 1) / (num_steps - 1)
    return np.asarray([round(i * stride) for i in range(num_steps)], np.int64)


def schedule_tables(ac_S: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step float64 tables of the chain whose steps have cumulative alphas `ac_S` (ascending
    timesteps; the full schedule or a respaced one): the step's beta, the posterior q(x_prev | x_t,
    x_0)'s variance (log clipped at step 0 as DiT does: there it is 0) and mean coefficients."""
    ac_prev = np.append(1.0, ac_S[:-1])
    beta = 1.0 - ac_S / ac_prev
    post_var = beta * (1.0 - ac_prev) / (1.0 - ac_S)
    clipped = np.append(post_var[1], post_var[1:])
    return {
        "ac": ac_S,
        "ac_prev": ac_prev,
        "log_beta": np.log(np.append(post_var[1], beta[1:])),  # DiT's "fixed large" at step 0, too
        "log_post_var": np.log(clipped),
        "coef_x0": beta * np.sqrt(ac_prev) / (1.0 - ac_S),
        "coef_xt": (1.0 - ac_prev) * np.sqrt(1.0 - beta) / (1.0 - ac_S),
    }


def _f32(tables: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in tables.items()}


def _bcast(v_B: jax.Array, x: jax.Array) -> jax.Array:
    return v_B.reshape(v_B.shape + (1,) * (x.ndim - v_B.ndim))


def predict_x0(xt: jax.Array, eps: jax.Array, ac: jax.Array) -> jax.Array:
    return jnp.sqrt(1.0 / ac) * xt - jnp.sqrt(1.0 / ac - 1.0) * eps


def model_log_variance(v: jax.Array | None, log_beta: jax.Array, log_post_var: jax.Array) -> jax.Array:
    """Learned range: v in [-1, 1] interpolates log beta (v = 1) and log posterior variance (v = -1);
    without a learned variance (v None), DiT's fixed "large" variance, beta."""
    if v is None:
        return log_beta
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_post_var


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x: jax.Array) -> jax.Array:
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """Log-probability of data in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)),
    elementwise (the t = 0 decoder term of the bound, as in DiT/ADM)."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def make_loss_fn(flow_cfg: FlowConfig, null_class: int | None, null_cond: dict | None = None):
    """loss_fn(model, x, y, rng) -> (loss, aux) for the ddpm objective, with `make_loss_fn`'s
    conventions (per-sample losses averaged over the batch; aux bins by t = timestep / T). A model
    with 2C output channels learns its variance (the bound term is added), C channels: eps MSE only."""
    T = flow_cfg.num_train_timesteps
    tab = _f32(schedule_tables(alphas_cumprod(flow_cfg)))

    def loss_fn(model, x_BxHxWxC, y_B, rng):
        if x_BxHxWxC.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C], got shape {x_BxHxWxC.shape}.")
        B, C = x_BxHxWxC.shape[0], x_BxHxWxC.shape[-1]
        x = x_BxHxWxC.astype(jnp.float32)
        u_B = sample_timesteps(jax.random.fold_in(rng, STREAM_T), B, flow_cfg)
        step_B = jnp.clip(jnp.floor(u_B * T).astype(jnp.int32), 0, T - 1)
        eps = jax.random.normal(jax.random.fold_in(rng, STREAM_NOISE), x.shape, jnp.float32)
        y_B = drop_condition_or_label(rng, y_B, flow_cfg.label_dropout, null_class, null_cond)

        at = {k: _bcast(v[step_B], x) for k, v in tab.items()}
        xt = jnp.sqrt(at["ac"]) * x + jnp.sqrt(1.0 - at["ac"]) * eps
        t_B = step_B.astype(jnp.float32) / T
        out = call_model(model)(xt, t_B, y_B).astype(jnp.float32)
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] not in (C, 2 * C):
            raise ValueError(f"model output shape {out.shape} must match input {x.shape} with {C} or {2 * C} channels.")
        eps_pred = out[..., :C]
        loss_B = jnp.mean(jnp.square(eps_pred - eps), axis=(1, 2, 3))
        if out.shape[-1] == 2 * C:
            # The bound trains the variance only: the mean's gradient comes from the MSE.
            x0_pred = predict_x0(xt, jax.lax.stop_gradient(eps_pred), at["ac"])
            mean_p = at["coef_x0"] * x0_pred + at["coef_xt"] * xt
            logvar_p = model_log_variance(out[..., C:], at["log_beta"], at["log_post_var"])
            mean_q = at["coef_x0"] * x + at["coef_xt"] * xt
            kl_B = jnp.mean(normal_kl(mean_q, at["log_post_var"], mean_p, logvar_p), axis=(1, 2, 3))
            nll_B = -jnp.mean(discretized_gaussian_log_likelihood(x, mean_p, 0.5 * logvar_p), axis=(1, 2, 3))
            loss_B = loss_B + jnp.where(step_B == 0, nll_B, kl_B) / math.log(2.0)  # in bits, as DiT
        return jnp.mean(loss_B), loss_bins(t_B, loss_B, flow_cfg.num_loss_bins)

    return loss_fn


def sample_loop(
    model_fn: ModelFn,
    noise_BxHxWxC: jax.Array,
    y_B: jax.Array | None,
    cfg: SamplerConfig,
    flow_cfg: FlowConfig,
    rng: jax.Array,
    null_class: int | None = None,
    return_trajectory: bool = False,
    null_cond=None,
):
    """DDPM ancestral (cfg.method "ddpm") or DDIM (eta 0, "ddim") sampling in one `lax.scan` over
    cfg.num_steps respaced timesteps, from x_T = noise. `rng` draws the ancestral noise (step i
    uses fold_in(rng, i)). Returns what the flow `sample_loop` returns."""
    from jax_mmdit.flow.samplers import check_condition, guided_model

    B, C = noise_BxHxWxC.shape[0], noise_BxHxWxC.shape[-1]
    T = flow_cfg.num_train_timesteps
    steps = respaced_timesteps(T, cfg.num_steps)
    tab = schedule_tables(alphas_cumprod(flow_cfg)[steps])
    # Descending order for the scan; each row carries that step's constants.
    rows = {k: jnp.asarray(v[::-1], jnp.float32) for k, v in tab.items()}
    rows["t"] = jnp.asarray(steps[::-1] / T, jnp.float32)
    rows["i"] = jnp.arange(len(steps), dtype=jnp.int32)
    check_condition(y_B, B)
    f = guided_model(model_fn, y_B, cfg, null_class, B, C, null_cond=null_cond)

    def body(x, r):
        out = f(x, r["t"])
        eps = out[..., :C]
        x0 = predict_x0(x, eps, r["ac"])
        if cfg.method == "ddim":
            x_prev = jnp.sqrt(r["ac_prev"]) * x0 + jnp.sqrt(1.0 - r["ac_prev"]) * eps
        else:
            v = out[..., C : 2 * C] if out.shape[-1] >= 2 * C else None
            logvar = model_log_variance(v, r["log_beta"], r["log_post_var"])
            mean = r["coef_x0"] * x0 + r["coef_xt"] * x
            z = jax.random.normal(jax.random.fold_in(rng, r["i"]), x.shape, jnp.float32)
            last = r["i"] == len(steps) - 1  # no noise on the step to x_0
            x_prev = mean + jnp.where(last, 0.0, 1.0) * jnp.exp(0.5 * logvar) * z
        return x_prev, (x_prev if return_trajectory else None)

    x = noise_BxHxWxC.astype(jnp.float32)
    x, traj = jax.lax.scan(body, x, rows)
    if not return_trajectory:
        return x
    return x, jnp.concatenate([noise_BxHxWxC.astype(jnp.float32)[None], traj], axis=0)
