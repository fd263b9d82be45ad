"""ODE samplers for Rectified Flow: Euler and Heun from t = 1 (noise) to t = 0 (data), with CFG.

The whole loop is traced once (`lax.scan`) so a jitted call runs every step without going back to
Python. `sample_loop` is the pure core over any velocity function; `sample` wraps an NNX model and
caches the compiled loop per (graphdef, config).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jax_mmdit.flow.config import FlowConfig, SamplerConfig, check_sampler_fits
from jax_mmdit.flow.rectified_flow import call_model, is_conditional, sit_model, time_shift

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]


def time_grid(num_steps: int, shift: float = 1.0) -> jax.Array:
    """f32[num_steps + 1] times from 1 down to 0, equally spaced before the resolution shift."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}.")
    return time_shift(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)


def guided_model(
    model_fn: VelocityFn,
    y_B: jax.Array | None,
    cfg: SamplerConfig,
    null_class: int | None,
    B: int,
    C: int,
    keep: int | None = None,
    null_cond=None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns f(x, t) with t a scalar: model_fn's float32 output (its first `keep` channels, None =
    all; at least C) with classifier-free guidance as the config asks, on the first
    cfg.cfg_channels (default C) channels; any further channels (a learned variance) come from the
    conditional pass. The condition `y_B` is labels (the unconditional pass gets null_class) or a
    pytree of arrays with leading dim B, e.g. text embeddings, whose unconditional pass gets
    `null_cond` (same structure, leading dim 1 or B: the empty or negative prompt)."""
    k = C if cfg.cfg_channels is None else cfg.cfg_channels
    if k > C:
        raise ValueError(f"cfg_channels={k} exceeds the {C} channels of the prediction.")

    def call(x, t_B, y):
        out = model_fn(x, t_B, y)
        if out.shape[:-1] != x.shape[:-1] or out.shape[-1] < C:
            raise ValueError(f"model output shape {out.shape} must match x {x.shape} with at least {C} channels.")
        return (out if keep is None else out[..., :keep]).astype(jnp.float32)

    def f_cond(x_BxHxWxC, t):
        return call(x_BxHxWxC, jnp.full((B,), t, jnp.float32), y_B)

    # cfg_scale == 1 is exactly the conditional model, so skip the unconditional pass altogether.
    if cfg.cfg_scale == 1.0:
        return f_cond
    if y_B is None or (null_cond is None and not is_conditional(null_class)):
        raise ValueError(
            f"cfg_scale={cfg.cfg_scale} needs a conditional model (labels with null_class > 0, or a condition "
            "with its null_cond); use cfg_scale=1.0 for unconditional sampling."
        )
    if null_cond is None:
        y_null = jnp.full_like(y_B, null_class)
    else:
        y_null = jax.tree.map(lambda n, y: jnp.broadcast_to(n, y.shape).astype(y.dtype), null_cond, y_B)
    y_2B = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), y_B, y_null)

    def f_guided(x_BxHxWxC, t):
        # One batched forward for both branches: better device utilisation than two calls.
        x_2BxHxWxC = jnp.concatenate([x_BxHxWxC, x_BxHxWxC], axis=0)
        out_2BxHxWxK = call(x_2BxHxWxC, jnp.full((2 * B,), t, jnp.float32), y_2B)
        cond, uncond = out_2BxHxWxK[:B], out_2BxHxWxK[B:]
        guided = uncond[..., :k] + cfg.cfg_scale * (cond[..., :k] - uncond[..., :k])
        return guided if guided.shape[-1] == cond.shape[-1] else jnp.concatenate([guided, cond[..., k:]], axis=-1)

    if cfg.cfg_interval is None or cfg.cfg_interval == (0.0, 1.0):
        return f_guided
    lo, hi = cfg.cfg_interval

    def f_interval(x_BxHxWxC, t):
        # lax.cond runs only the chosen branch, so outside the interval a step costs one pass, not two.
        return jax.lax.cond((t >= lo) & (t <= hi), f_guided, f_cond, x_BxHxWxC, t)

    return f_interval


def check_condition(y_B, B: int) -> None:
    """Labels of shape (B,), or a condition pytree whose arrays all lead with B."""
    if y_B is None:
        return
    if not isinstance(y_B, dict) and jnp.shape(y_B) != (B,):
        raise ValueError(f"y must have shape ({B},) to match noise, got {jnp.shape(y_B)}.")
    bad = [jnp.shape(a) for a in jax.tree.leaves(y_B) if jnp.shape(a)[:1] != (B,)]
    if bad:
        raise ValueError(f"Every array of the condition must lead with the batch {B}, got {bad}.")


def sample_loop(
    velocity_fn: VelocityFn,
    noise_BxHxWxC: jax.Array,
    y_B: jax.Array | None,
    cfg: SamplerConfig,
    null_class: int | None = None,
    return_trajectory: bool = False,
    null_cond=None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Integrates dx/dt = v(x, t) from t = 1 (noise_BxHxWxC) to t = 0; pure and jittable (caller jits).

    velocity_fn(x, t_B, y_B) -> v is called with t_B of shape [x.shape[0]] (2B under CFG, where the
    unconditional half gets y = null_class). Guidance: v = v_u + s * (v_c - v_u), only for t inside
    cfg.cfg_interval when given. The state is integrated in fp32.

    Heun uses 2 calls on every step, the last one to t = 0 included. EDM (Karras et al. 2022) makes
    its last step Euler because there it is tiny (sigma_min ~ 0.002); in Rectified Flow it is a full
    1/N step and v(x, 0) is well defined, and skipping the correction cost 4-6x in accuracy on the
    exact Gaussian flow (e.g. max error 0.032 vs 0.008 at 16 steps).

    Returns x0_BxHxWxC, or (x0, traj_SxBxHxWxC) with S = num_steps + 1, traj[0] = noise, traj[-1] = x0.
    """
    if noise_BxHxWxC.ndim < 2 or not jnp.issubdtype(noise_BxHxWxC.dtype, jnp.floating):
        raise ValueError(f"noise must be a float array [B, ...], got {noise_BxHxWxC.dtype}{noise_BxHxWxC.shape}.")
    B, C = noise_BxHxWxC.shape[0], noise_BxHxWxC.shape[-1]
    check_condition(y_B, B)
    v = guided_model(velocity_fn, y_B, cfg, null_class, B, C, keep=C, null_cond=null_cond)
    t_S = time_grid(cfg.num_steps, cfg.shift)

    def euler_step(x, t, t_next):
        return x + (t_next - t) * v(x, t)

    def heun_step(x, t, t_next):
        dt = t_next - t
        d1 = v(x, t)
        d2 = v(x + dt * d1, t_next)
        return x + dt * 0.5 * (d1 + d2)

    step = heun_step if cfg.method == "heun" else euler_step

    def body(x, t_pair):
        x_next = step(x, t_pair[0], t_pair[1])
        return x_next, (x_next if return_trajectory else None)

    x = noise_BxHxWxC.astype(jnp.float32)
    x, traj = jax.lax.scan(body, x, (t_S[:-1], t_S[1:]))
    if not return_trajectory:
        return x
    traj_SxBxHxWxC = jnp.concatenate([noise_BxHxWxC.astype(jnp.float32)[None], traj], axis=0)
    return x, traj_SxBxHxWxC


@partial(jax.jit, static_argnames=("graphdef", "cfg", "flow", "null_class", "return_trajectory"))
def _sample_jitted(graphdef, state, noise_BxHxWxC, y_B, rng, null_cond, *, cfg, flow, null_class, return_trajectory):
    # jax.jit keys its cache on the static (hashable) graphdef and configs: repeated calls with the
    # same model structure, configs and shapes reuse the compiled loop, whatever the weights.
    model = nnx.merge(graphdef, state)
    # A dict condition holds the model's keyword inputs (text: context_BxTxE, pooled_BxP, ...).
    fn = call_model(model)
    if flow.objective == "ddpm":
        from jax_mmdit.flow import ddpm  # ddpm builds on this module

        return ddpm.sample_loop(fn, noise_BxHxWxC, y_B, cfg, flow, rng, null_class, return_trajectory, null_cond)
    if cfg.method == "meanflow":
        from jax_mmdit.flow import meanflow  # meanflow builds on this module

        u = meanflow.mean_model(model)
        return meanflow.sample_loop(u, noise_BxHxWxC, y_B, cfg, null_class, return_trajectory, null_cond)
    fn = sit_model(fn) if flow.objective == "sit" else fn
    return sample_loop(fn, noise_BxHxWxC, y_B, cfg, null_class, return_trajectory, null_cond)


def compiled_sampler_count() -> int:
    """How many sampling loops `sample` has compiled in this process (one per model structure,
    config and shape, whatever the weights)."""
    return _sample_jitted._cache_size()


def sample(
    model: nnx.Module,
    noise_BxHxWxC: jax.Array,
    y_B: jax.Array | None,
    cfg: SamplerConfig,
    return_trajectory: bool = False,
    flow: FlowConfig | None = None,
    rng: jax.Array | None = None,
    null_cond=None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Samples from an NNX model `model(x, t_B, y_B)` with the whole loop in one jitted call.

    `flow` names the objective the model was trained with (None: rectified flow): "sit" runs the
    same ODE samplers through `sit_model`, "ddpm" the DDPM/DDIM samplers of `jax_mmdit.flow.ddpm`,
    whose ancestral noise comes from `rng` (None: key 0); a "meanflow" model samples with the
    "meanflow" jumps of `jax_mmdit.flow.meanflow` or, at h = 0, the ODE samplers. The null class is `model.null_class`
    (== num_classes); a model without it, or with 0, is unconditional and cannot use
    cfg_scale != 1. A text-conditioned model takes `y_B` as a dict of its keyword inputs
    (context_BxTxE, pooled_BxP, context_mask_BxT) and guides against `null_cond` (the same for the
    empty or negative prompt). Returns what `sample_loop` returns.
    """
    flow = FlowConfig() if flow is None else flow
    check_sampler_fits(flow, cfg)
    null_class = getattr(model, "null_class", None)
    null_class = int(null_class) if is_conditional(null_class) else None
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    return _sample_jitted(
        graphdef,
        state,
        noise_BxHxWxC,
        y_B,
        rng,
        null_cond,
        cfg=cfg,
        flow=flow,
        null_class=null_class,
        return_trajectory=return_trajectory,
    )
