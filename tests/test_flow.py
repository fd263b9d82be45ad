"""Tests for jax_mmdit.flow: interpolation, timestep sampling, loss, samplers and CFG."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_mmdit.flow import (
    STREAM_LABEL_DROP,
    STREAM_NOISE,
    STREAM_T,
    FlowConfig,
    SamplerConfig,
    drop_labels,
    interpolate,
    make_loss_fn,
    sample,
    sample_loop,
    sample_timesteps,
    shift_for_resolution,
    time_grid,
    time_shift,
    velocity_target,
)
from jax_mmdit.flow import samplers as samplers_mod

B, H, W, C = 4, 4, 4, 2


def _data(seed=0, shape=(B, H, W, C)):
    kx, kn = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, shape), jax.random.normal(kn, shape)


class TinyModel(nnx.Module):
    """Linear over flattened pixels + t, plus a class embedding: enough to check gradients flow."""

    def __init__(self, num_classes: int, out_channels: int = C, *, rngs: nnx.Rngs):
        self.out_channels = out_channels
        self.lin = nnx.Linear(H * W * C + 1, H * W * out_channels, rngs=rngs)
        self.emb = nnx.Embed(num_classes + 1, H * W * out_channels, rngs=rngs)
        self.null_class = num_classes

    def __call__(self, x_BxHxWxC, t_B, y_B):
        b = x_BxHxWxC.shape[0]
        h_BxD = jnp.concatenate([x_BxHxWxC.reshape(b, -1), t_B[:, None]], axis=1)
        out = self.lin(h_BxD) + self.emb(y_B)
        return out.reshape(b, H, W, self.out_channels)


# ---------------------------------------------------------------- interpolation and loss target


def test_interpolation_endpoints_and_target():
    x, eps = _data()
    np.testing.assert_allclose(interpolate(x, eps, jnp.zeros(B)), x, atol=0)
    np.testing.assert_allclose(interpolate(x, eps, jnp.ones(B)), eps, atol=0)
    np.testing.assert_allclose(interpolate(x, eps, jnp.full(B, 0.25)), 0.75 * x + 0.25 * eps, atol=1e-6)
    # The target is the time derivative of the path.
    ddt = jax.jacfwd(lambda t: interpolate(x, eps, jnp.full(B, t)))(0.3)
    np.testing.assert_allclose(ddt, velocity_target(x, eps), atol=1e-5)
    np.testing.assert_allclose(velocity_target(x, eps), eps - x, atol=0)


def test_loss_matches_manual_computation_and_uses_first_c_channels():
    x, _ = _data()
    y = jnp.array([0, 1, 2, 1])
    rng = jax.random.key(7)
    flow_cfg = FlowConfig(timestep_sampling="uniform", label_dropout=0.0)
    seen = {}

    def model(xt, t, yy):
        seen.update(xt=xt, t=t, y=yy)
        # learn_sigma style: extra channels full of garbage that must be ignored.
        return jnp.concatenate([-xt, jnp.full_like(xt, 1e6)], axis=-1)

    loss, aux = make_loss_fn(flow_cfg, null_class=3)(model, x, y, rng)
    t = sample_timesteps(jax.random.fold_in(rng, STREAM_T), B, flow_cfg)
    eps = jax.random.normal(jax.random.fold_in(rng, STREAM_NOISE), x.shape)
    xt = interpolate(x, eps, t)
    np.testing.assert_allclose(seen["t"], t, atol=0)
    np.testing.assert_allclose(seen["xt"], xt, atol=1e-6)
    np.testing.assert_array_equal(seen["y"], y)
    mse_B = jnp.mean((-xt - (eps - x)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(loss, mse_B.mean(), rtol=1e-6)
    # aux: counts per bin of t, sums of per-sample MSE per bin.
    bins = np.minimum((np.asarray(t) * 10).astype(int), 9)
    np.testing.assert_array_equal(aux["loss_bin_count"], np.bincount(bins, minlength=10))
    np.testing.assert_allclose(aux["loss_bin_sum"], np.bincount(bins, np.asarray(mse_B), minlength=10), rtol=1e-6)
    assert aux["loss_bin_sum"].dtype == jnp.float32 and aux["loss_bin_count"].shape == (10,)


def test_loss_rejects_too_few_channels():
    x, _ = _data()
    loss_fn = make_loss_fn(FlowConfig(), null_class=None)
    with pytest.raises(ValueError, match="channels"):
        loss_fn(lambda xt, t, y: xt[..., :1], x, None, jax.random.key(0))


def test_loss_is_jittable_and_differentiable_with_nnx_model():
    model = TinyModel(num_classes=3, out_channels=2 * C, rngs=nnx.Rngs(0))  # learn_sigma-style output
    x, _ = _data(1)
    y = jnp.array([0, 1, 2, 0])
    loss_fn = make_loss_fn(FlowConfig(), null_class=model.null_class)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y, rng):
        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, x, y, rng)
        optimizer.update(model, grads)
        return loss, aux, grads

    rng = jax.random.key(3)
    eager_loss, _ = loss_fn(model, x, y, rng)
    loss0, aux, grads = train_step(model, optimizer, x, y, rng)
    np.testing.assert_allclose(loss0, eager_loss, rtol=1e-5)
    assert float(aux["loss_bin_count"].sum()) == B
    grad_norm = optax.tree.norm(jax.tree.leaves(nnx.state(grads, nnx.Param)))
    assert np.isfinite(grad_norm) and grad_norm > 0
    for _ in range(30):
        loss, _, _ = train_step(model, optimizer, x, y, rng)  # same batch and rng: must fit it
    assert float(loss) < 0.5 * float(loss0)


# ---------------------------------------------------------------- timestep sampling and shift


def test_logit_normal_median_is_sigmoid_of_mean():
    cfg = FlowConfig(timestep_sampling="logit_normal", logit_mean=0.8, logit_std=1.3)
    t = np.asarray(sample_timesteps(jax.random.key(0), 20000, cfg))
    assert t.min() >= 0 and t.max() <= 1
    assert abs(np.median(t) - 1 / (1 + math.exp(-0.8))) < 0.01


def test_mode_sampling_scale_zero_is_uniform_and_positive_scale_favours_middle():
    rng = jax.random.key(1)
    t0 = sample_timesteps(rng, 20000, FlowConfig(timestep_sampling="mode", mode_scale=0.0))
    u = jax.random.uniform(rng, (20000,))
    np.testing.assert_allclose(t0, 1.0 - u, atol=1e-6)
    hist, _ = np.histogram(np.asarray(t0), bins=10, range=(0, 1))
    assert np.all(np.abs(hist / 20000 - 0.1) < 0.01)
    t1 = np.asarray(sample_timesteps(rng, 20000, FlowConfig(timestep_sampling="mode", mode_scale=1.29)))
    assert t1.min() >= 0 and t1.max() <= 1
    assert t1.var() < 0.8 / 12  # more concentrated than uniform (variance 1/12)
    assert abs(np.median(t1) - 0.5) < 0.02  # symmetric about 1/2


def test_time_shift_endpoints_monotone_and_applied_to_samples():
    t = jnp.linspace(0.0, 1.0, 101)
    for s in (0.5, 1.0, 3.0):
        ts = time_shift(t, s)
        assert float(ts[0]) == 0.0 and float(ts[-1]) == 1.0
        assert np.all(np.diff(np.asarray(ts)) > 0)
    assert np.all(np.asarray(time_shift(t, 3.0))[1:-1] > np.asarray(t)[1:-1])  # s > 1: noisier
    assert float(time_shift(0.5, 3.0)) == pytest.approx(0.75)
    rng = jax.random.key(2)
    base = sample_timesteps(rng, 64, FlowConfig(timestep_sampling="uniform"))
    shifted = sample_timesteps(rng, 64, FlowConfig(timestep_sampling="uniform", shift=3.0))
    np.testing.assert_allclose(shifted, time_shift(base, 3.0), atol=1e-6)
    assert shift_for_resolution(512, 512) == pytest.approx(2.0)
    assert shift_for_resolution(32, 32, base_height=32, base_width=32) == 1.0
    grid = time_grid(4, shift=3.0)
    np.testing.assert_allclose(grid, time_shift(jnp.array([1.0, 0.75, 0.5, 0.25, 0.0]), 3.0), atol=1e-6)


# ---------------------------------------------------------------- label dropout and RNG streams


def test_label_dropout_rate_and_null_index():
    y = jax.random.randint(jax.random.key(0), (20000,), 0, 10)
    dropped = np.asarray(drop_labels(jax.random.key(1), y, 0.3, null_class=10))
    is_null = dropped == 10
    assert abs(is_null.mean() - 0.3) < 0.015
    np.testing.assert_array_equal(dropped[~is_null], np.asarray(y)[~is_null])
    np.testing.assert_array_equal(drop_labels(jax.random.key(1), y, 0.0, 10), y)


def test_streams_are_independent_of_label_dropout_and_unconditional_keeps_labels():
    x, _ = _data()
    y = jnp.arange(B) % 3
    rng = jax.random.key(5)
    seen = []
    model = lambda xt, t, yy: (seen.append((xt, t, yy)), jnp.zeros_like(xt))[1]  # noqa: E731
    make_loss_fn(FlowConfig(label_dropout=0.0), null_class=3)(model, x, y, rng)
    make_loss_fn(FlowConfig(label_dropout=0.9), null_class=3)(model, x, y, rng)
    make_loss_fn(FlowConfig(label_dropout=0.9), null_class=None)(model, x, y, rng)
    (xt0, t0, y0), (xt1, t1, y1), (_, _, y2) = seen
    np.testing.assert_array_equal(xt0, xt1)  # same noise and t with or without dropout
    np.testing.assert_array_equal(t0, t1)
    np.testing.assert_array_equal(y0, y)
    expected = drop_labels(jax.random.fold_in(rng, STREAM_LABEL_DROP), y, 0.9, 3)
    np.testing.assert_array_equal(y1, expected)
    assert np.any(np.asarray(y1) == 3)
    np.testing.assert_array_equal(y2, y)  # unconditional: no dropout at all
    assert len({STREAM_T, STREAM_NOISE, STREAM_LABEL_DROP}) == 3


# ---------------------------------------------------------------- samplers


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_samplers_exact_on_constant_velocity(method):
    noise, c = _data(2)
    cfg = SamplerConfig(method=method, num_steps=3, shift=3.0)
    x0 = jax.jit(lambda n: sample_loop(lambda x, t, y: jnp.broadcast_to(c, x.shape), n, None, cfg))(noise)
    np.testing.assert_allclose(x0, noise - c, atol=1e-5)


def test_convergence_orders_on_linear_ode():
    a = 1.5
    noise = jnp.ones((1, 1, 1, 1))
    exact = math.exp(-a)  # dx/dt = a x integrated from t = 1 to t = 0

    def err(method, n):
        x0 = sample_loop(lambda x, t, y: a * x, noise, None, SamplerConfig(method=method, num_steps=n))
        return abs(float(x0.squeeze()) - exact)

    for method, lo, hi in (("euler", 1.8, 2.2), ("heun", 3.0, 5.0)):
        errs = [err(method, n) for n in (8, 16, 32)]
        ratios = [errs[0] / errs[1], errs[1] / errs[2]]
        assert all(lo <= r <= hi for r in ratios), (method, errs, ratios)
    assert err("heun", 16) < 0.1 * err("euler", 16)


def _toy_conditional_field(num_classes):
    """v(x, t, y) = a[y] * x + b[y] * t: differs per class, null class included."""
    a = jnp.linspace(-0.5, 0.7, num_classes + 1)
    b = jnp.linspace(1.0, -2.0, num_classes + 1)
    calls = []

    def v(x, t, y):
        calls.append(x.shape[0])
        return a[y][:, None, None, None] * x + b[y][:, None, None, None] * t[:, None, None, None]

    return v, a, b, calls


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_guidance_scale_one_equals_conditional_model(method):
    v, _, _, calls = _toy_conditional_field(3)
    noise, _ = _data(3)
    y = jnp.array([0, 1, 2, 1])
    guided = sample_loop(v, noise, y, SamplerConfig(method=method, num_steps=5, cfg_scale=1.0), null_class=3)
    plain = sample_loop(v, noise, y, SamplerConfig(method=method, num_steps=5), null_class=None)
    np.testing.assert_array_equal(guided, plain)
    assert set(calls) == {B}  # no unconditional pass was made


def test_cfg_formula_single_batched_pass_and_interval():
    v, a, b, calls = _toy_conditional_field(3)
    noise, _ = _data(4)
    y = jnp.array([0, 1, 2, 1])
    s = 4.0

    def guided_v(x, t):
        tt = jnp.full((B,), t)
        v_c, v_u = v(x, tt, y), v(x, tt, jnp.full_like(y, 3))
        return v_u + s * (v_c - v_u)

    # One Euler step from t = 1 to 0.
    calls.clear()
    x0 = sample_loop(v, noise, y, SamplerConfig(num_steps=1, cfg_scale=s), null_class=3)
    assert calls == [2 * B]  # conditional and unconditional in one batched forward
    np.testing.assert_allclose(x0, noise - guided_v(noise, 1.0), atol=1e-5)

    # Two steps, guidance only for t in [0, 0.5]: first step (t = 1) conditional, second guided.
    x_half = noise - 0.5 * v(noise, jnp.ones(B), y)
    expected = x_half - 0.5 * guided_v(x_half, 0.5)
    x0 = sample_loop(v, noise, y, SamplerConfig(num_steps=2, cfg_scale=s, cfg_interval=(0.0, 0.5)), null_class=3)
    np.testing.assert_allclose(x0, expected, atol=1e-5)
    # Same under jit (lax.cond on a traced t).
    x0_jit = jax.jit(
        lambda n: sample_loop(v, n, y, SamplerConfig(num_steps=2, cfg_scale=s, cfg_interval=(0.0, 0.5)), null_class=3)
    )(noise)
    np.testing.assert_allclose(x0_jit, expected, atol=1e-5)


def test_cfg_needs_conditional_model():
    v, _, _, _ = _toy_conditional_field(3)
    noise, _ = _data()
    with pytest.raises(ValueError, match="needs a conditional model"):
        sample_loop(v, noise, jnp.zeros(B, jnp.int32), SamplerConfig(cfg_scale=2.0), null_class=None)
    with pytest.raises(ValueError, match="needs a conditional model"):
        sample_loop(v, noise, None, SamplerConfig(cfg_scale=2.0), null_class=3)


@pytest.mark.parametrize("method,num_steps,map_atol", [("euler", 200, 0.06), ("heun", 32, 0.015)])
def test_optimal_gaussian_velocity_reproduces_data_distribution(method, num_steps, map_atol):
    # Data x ~ N(mu, sigma^2) per channel, eps ~ N(0, 1), x_t = (1-t) x + t eps. (v, x_t) are jointly
    # Gaussian with E[v] = -mu, Cov(v, x_t) = t - (1-t) sigma^2, Var(x_t) = (1-t)^2 sigma^2 + t^2, so
    # E[eps - x | x_t] = -mu + Cov/Var * (x_t - (1-t) mu). Its ODE maps eps to mu + sigma * eps exactly.
    mu = jnp.array([2.0, -1.0, 0.5])
    sigma = jnp.array([0.5, 1.5, 0.2])

    def v_opt(x, t_B, y):
        t = t_B[:, None, None, None]
        var = (1 - t) ** 2 * sigma**2 + t**2
        return -mu + (t - (1 - t) * sigma**2) / var * (x - (1 - t) * mu)

    noise = jax.random.normal(jax.random.key(0), (4096, 2, 2, 3))
    cfg = SamplerConfig(method=method, num_steps=num_steps)
    x0 = jax.jit(lambda n: sample_loop(v_opt, n, None, cfg))(noise)
    flat, flat_noise = np.asarray(x0).reshape(-1, 3), np.asarray(noise).reshape(-1, 3)
    target = np.asarray(mu) + np.asarray(sigma) * flat_noise
    np.testing.assert_allclose(flat.mean(0), np.asarray(mu), atol=0.03 * float(sigma.max()), rtol=0.03)
    np.testing.assert_allclose(flat.std(0), np.asarray(sigma), rtol=0.03)
    np.testing.assert_allclose(flat, target, atol=map_atol)  # the deterministic map itself


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_trajectory_shape_and_endpoints(method):
    v, _, _, _ = _toy_conditional_field(3)
    noise, _ = _data(5)
    y = jnp.array([0, 1, 2, 1])
    cfg = SamplerConfig(method=method, num_steps=4, cfg_scale=2.0)
    x0, traj = sample_loop(v, noise, y, cfg, null_class=3, return_trajectory=True)
    assert traj.shape == (5, B, H, W, C)
    np.testing.assert_array_equal(traj[0], noise)
    np.testing.assert_array_equal(traj[-1], x0)
    np.testing.assert_allclose(x0, sample_loop(v, noise, y, cfg, null_class=3), atol=1e-6)
    assert not np.allclose(traj[1], traj[2])  # intermediate states are recorded, not repeated


def test_sampler_uses_first_c_channels():
    noise, c = _data(6)
    out = lambda x, t, y: jnp.concatenate([jnp.broadcast_to(c, x.shape), jnp.full_like(x, 1e6)], -1)  # noqa: E731
    np.testing.assert_allclose(sample_loop(out, noise, None, SamplerConfig(num_steps=2)), noise - c, atol=1e-5)


def test_sample_with_nnx_model_matches_core_and_caches_compilation():
    model = TinyModel(num_classes=3, rngs=nnx.Rngs(0))
    noise, _ = _data(7)
    y = jnp.array([0, 1, 2, 1])
    cfg = SamplerConfig(method="heun", num_steps=3, cfg_scale=3.0)
    x0, traj = sample(model, noise, y, cfg, return_trajectory=True)
    expected = sample_loop(model, noise, y, cfg, null_class=3)
    np.testing.assert_allclose(x0, expected, atol=1e-5)
    assert traj.shape == (4, B, H, W, C)
    size = samplers_mod.compiled_sampler_count()
    other = TinyModel(num_classes=3, rngs=nnx.Rngs(1))  # same structure, new weights: no recompile
    x0_other = sample(other, noise, y, cfg, return_trajectory=True)[0]
    assert samplers_mod.compiled_sampler_count() == size
    assert not np.allclose(x0_other, x0)
    with pytest.raises(ValueError, match="needs a conditional model"):
        sample(TinyModel(num_classes=0, rngs=nnx.Rngs(0)), noise, jnp.zeros(B, jnp.int32), cfg)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(timestep_sampling="cosine"),
        dict(logit_std=0.0),
        dict(mode_scale=2.0),
        dict(shift=0.0),
        dict(label_dropout=1.0),
        dict(num_loss_bins=0),
    ],
)
def test_flow_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        FlowConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="rk4"),
        dict(num_steps=0),
        dict(cfg_scale=-1.0),
        dict(cfg_interval=(0.6, 0.4)),
        dict(cfg_interval=(0.0,)),
        dict(shift=float("nan")),
    ],
)
def test_sampler_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        SamplerConfig(**kwargs)


def test_sampler_config_interval_is_hashable_tuple():
    cfg = SamplerConfig(cfg_interval=[0.1, 0.9])
    assert cfg.cfg_interval == (0.1, 0.9) and hash(cfg) == hash(SamplerConfig(cfg_interval=(0.1, 0.9)))
