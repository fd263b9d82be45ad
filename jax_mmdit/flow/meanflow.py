"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): the model predicts
the average velocity u(z_t, r, t) = (z_t - z_r) / (t - r) of the rectified-flow ODE over [r, t], so
one jump z_r = z_t - (t - r) u goes from t to r; from t = 1 to 0 it draws an image in one step.

Training uses the MeanFlow identity u = v - (t - r) du/dt, with du/dt = v . du/dz + du/dt (r held
fixed) the total derivative along the trajectory, one `jax.jvp` of the network with tangents
(v, 1, 1) on its inputs (z, t, h = t - r). The target sg(v - (t - r) du/dt) uses the conditional
velocity eps - x in place of the marginal one: the target is affine in v, so its expectation is
the marginal target. At r = t it is the plain flow-matching target v.

The network takes (t, h) (`ModelConfig.interval_embed`); h = 0 is its instantaneous velocity, so
the same model also samples with the Euler/Heun ODE samplers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mmdit.flow.config import FlowConfig, SamplerConfig
from jax_mmdit.flow.rectified_flow import (
    STREAM_LABEL_DROP,
    STREAM_NOISE,
    STREAM_T,
    drop_condition_or_label,
    expand_like,
    interpolate,
    is_conditional,
    loss_bins,
    sample_timesteps,
    velocity_target,
)

# Streams beside rectified flow's (t, noise, label dropout keep their ids and their draws).
STREAM_R = 3
STREAM_EQUAL = 4

# u(z, t_B, h_B, y) -> average velocity over [t - h, t].
MeanFn = Callable[[jax.Array, jax.Array, jax.Array, object], jax.Array]


def sample_t_r(rng: jax.Array, batch_size: int, cfg: FlowConfig) -> tuple[jax.Array, jax.Array]:
    """(t_B, r_B) with r <= t: two draws of cfg's timestep schedule, ordered; a fraction
    cfg.meanflow.equal_fraction of the samples get r = t (instantaneous velocity)."""
    a_B = sample_timesteps(jax.random.fold_in(rng, STREAM_T), batch_size, cfg)
    b_B = sample_timesteps(jax.random.fold_in(rng, STREAM_R), batch_size, cfg)
    t_B, r_B = jnp.maximum(a_B, b_B), jnp.minimum(a_B, b_B)
    equal_B = jax.random.bernoulli(jax.random.fold_in(rng, STREAM_EQUAL), cfg.meanflow.equal_fraction, (batch_size,))
    return t_B, jnp.where(equal_B, t_B, r_B)


def mean_model(model: Callable) -> MeanFn:
    """`model` (with interval_embed) as u(x, t_B, h_B, y): y labels, or a dict of its keyword inputs."""
    return lambda x, t_B, h_B, y: model(x, t_B, h_B=h_B, **y) if isinstance(y, dict) else model(x, t_B, y, h_B=h_B)


def average_velocity_target(
    u_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    z_BxHxWxC: jax.Array,
    t_B: jax.Array,
    r_B: jax.Array,
    v_BxHxWxC: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(u, u_tgt): the prediction u_fn(z, t, h = t - r) and the MeanFlow target
    stop_gradient(v - (t - r) du/dt), du/dt the jvp of u_fn along (dz, dt, dh) = (v, 1, 1)."""
    h_B = t_B - r_B
    ones_B = jnp.ones_like(t_B)
    u, du_dt = jax.jvp(u_fn, (z_BxHxWxC, t_B, h_B), (v_BxHxWxC, ones_B, ones_B))
    u_tgt = v_BxHxWxC - expand_like(jnp.clip(h_B, 0.0, 1.0), du_dt) * du_dt
    return u, jax.lax.stop_gradient(u_tgt)


def _null_like(y, null_class: int | None, null_cond: dict | None):
    if isinstance(y, dict):
        return {k: jnp.broadcast_to(null_cond[k], v.shape).astype(v.dtype) if k in null_cond else v
                for k, v in y.items()}  # fmt: skip
    return jnp.full_like(y, null_class)


def guided_velocity(u: MeanFn, z, t_B, y, v, flow_cfg: FlowConfig, null_class, null_cond) -> jax.Array:
    """MeanFlow's training-time guidance: omega*v + kappa*v_c + (1-omega-kappa)*v_u, v_c and v_u the
    model's own conditional and unconditional velocities (h = 0), without gradient; v itself
    outside the guidance interval."""
    m = flow_cfg.meanflow
    B, C = z.shape[0], z.shape[-1]
    lo, hi = m.guidance_interval
    inside_B = (t_B >= lo) & (t_B <= hi)
    omega = expand_like(jnp.where(inside_B, m.omega, 1.0), v)
    kappa = expand_like(jnp.where(inside_B, m.kappa, 0.0), v)
    y_null = _null_like(y, null_class, null_cond)
    if m.kappa == 0.0:
        v_u, v_c = u(z, t_B, jnp.zeros_like(t_B), y_null), 0.0
    else:  # both branches in one batched forward
        cat = lambda a, b: jnp.concatenate([a, b], axis=0)  # noqa: E731
        t_2B = cat(t_B, t_B)
        out = u(cat(z, z), t_2B, jnp.zeros_like(t_2B), jax.tree.map(cat, y_null, y))
        v_u, v_c = out[:B], out[B:]
    v_u = v_u[..., :C].astype(jnp.float32)
    v_c = v_c if isinstance(v_c, float) else v_c[..., :C].astype(jnp.float32)
    return jax.lax.stop_gradient(omega * v + kappa * v_c + (1.0 - omega - kappa) * v_u)


def make_loss_fn(flow_cfg: FlowConfig, null_class: int | None, null_cond: dict | None = None):
    """loss_fn(model, x, y, rng) -> (loss, aux) for the meanflow objective (see the module doc).

    The loss is the batch mean of the adaptively weighted squared error ||u - u_tgt||^2 / sg((||.||^2
    + norm_eps)^norm_p), squared errors summed over pixels as the paper's code does. Such weights
    make the loss about 1 whatever the fit, so aux["mse"] carries the plain per-pixel mean squared
    error to the target, the number the trainer logs as the loss; the loss bins are of it too.
    Labels (or text conditions) dropped for CFG train the unguided, unconditional target.
    """
    m = flow_cfg.meanflow
    conditional = null_cond is not None or is_conditional(null_class)
    if m.guided and not conditional:
        raise ValueError("meanflow.omega/kappa guide a conditional model; this one is unconditional (use 1 and 0).")

    def loss_fn(model, x_BxHxWxC: jax.Array, y, rng: jax.Array):
        if x_BxHxWxC.ndim != 4:
            raise ValueError(f"x must be [B, H, W, C], got shape {x_BxHxWxC.shape}.")
        B, C = x_BxHxWxC.shape[0], x_BxHxWxC.shape[-1]
        x_BxHxWxC = x_BxHxWxC.astype(jnp.float32)
        t_B, r_B = sample_t_r(rng, B, flow_cfg)
        noise = jax.random.normal(jax.random.fold_in(rng, STREAM_NOISE), x_BxHxWxC.shape, jnp.float32)
        z = interpolate(x_BxHxWxC, noise, t_B)
        v = velocity_target(x_BxHxWxC, noise)
        u = mean_model(model)
        y_in = drop_condition_or_label(rng, y, flow_cfg.label_dropout, null_class, null_cond)
        if m.guided:
            # The same draw drop_condition_or_label made: dropped samples learn the unguided target.
            p = flow_cfg.label_dropout
            drop_B = jax.random.bernoulli(jax.random.fold_in(rng, STREAM_LABEL_DROP), p, (B,)) if p > 0 else False
            v_g = guided_velocity(u, z, t_B, y, v, flow_cfg, null_class, null_cond)
            v = jnp.where(expand_like(jnp.asarray(drop_B), v), v, v_g)

        # The model is rebuilt inside the jvp: NNX transforms in it (remat) then update Variables
        # of the jvp's own trace, not ones created outside it.
        graphdef, state = nnx.split(model)

        def u_fn(z_, t_, h_):
            out = mean_model(nnx.merge(graphdef, state))(z_, t_, h_, y_in)
            if out.shape[:-1] != z_.shape[:-1] or out.shape[-1] < C:
                raise ValueError(f"model output shape {out.shape} must match input {z_.shape} with >= {C} channels.")
            return out[..., :C].astype(jnp.float32)

        pred, target = average_velocity_target(u_fn, z, t_B, r_B, v)
        sq_B = jnp.sum(jnp.square(pred - target), axis=(1, 2, 3))
        weight_B = jax.lax.stop_gradient((sq_B + m.norm_eps) ** m.norm_p) if m.norm_p > 0 else 1.0
        mse_B = sq_B / (x_BxHxWxC.size // B)
        aux = loss_bins(t_B, mse_B, flow_cfg.num_loss_bins)
        aux["mse"] = jax.lax.stop_gradient(jnp.mean(mse_B))
        return jnp.mean(sq_B / weight_B), aux

    return loss_fn


def sample_loop(
    u: MeanFn,
    noise_BxHxWxC: jax.Array,
    y_B,
    cfg: SamplerConfig,
    null_class: int | None = None,
    return_trajectory: bool = False,
    null_cond=None,
):
    """cfg.num_steps average-velocity jumps z_r = z_t - (t - r) u(z_t, t, t - r) along the time grid
    from t = 1 to 0, in one `lax.scan` (pure; the caller jits). Guidance was folded in at training;
    cfg_scale != 1 adds plain CFG on u on top. Returns what `samplers.sample_loop` returns."""
    from jax_mmdit.flow.samplers import check_condition, guided_model, time_grid  # samplers dispatch here

    B, C = noise_BxHxWxC.shape[0], noise_BxHxWxC.shape[-1]
    check_condition(y_B, B)
    t_S = time_grid(cfg.num_steps, cfg.shift)

    def body(x, t_pair):
        t, r = t_pair
        at_interval = lambda x_, t_B, y: u(x_, t_B, jnp.full_like(t_B, t - r), y)  # noqa: E731
        u_t = guided_model(at_interval, y_B, cfg, null_class, B, C, keep=C, null_cond=null_cond)(x, t)
        x_next = x - (t - r) * u_t
        return x_next, (x_next if return_trajectory else None)

    x0 = noise_BxHxWxC.astype(jnp.float32)
    x, traj = jax.lax.scan(body, x0, (t_S[:-1], t_S[1:]))
    if not return_trajectory:
        return x
    return x, jnp.concatenate([x0[None], traj], axis=0)
