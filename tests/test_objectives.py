"""The objectives published checkpoints were trained with: DiT's DDPM (loss, DDPM/DDIM samplers,
checked against diffusers' schedulers) and SiT's time/sign convention (an exact velocity field)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_mmdit.errors import UserError
from jax_mmdit.flow import FlowConfig, SamplerConfig, ddpm, make_loss_fn, sample

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B, H, W, C = 2, 4, 4, 2
DDPM = FlowConfig(objective="ddpm", timestep_sampling="uniform")


class FnModel(nnx.Module):
    """A parameter-free NNX module around a function, so `sample` can split and jit it."""

    def __init__(self, fn, null_class=None):
        self.fn, self.null_class = fn, null_class

    def __call__(self, x, t, y):
        return self.fn(x, t, y)


def _toy_out(x, t_B, y=None):
    """A smooth stand-in for a network: eps (C channels; near x_t, so the chain stays bounded) and
    the learned-variance value (C)."""
    t = t_B[:, None, None, None]
    eps = 0.95 * x + 0.2 * jnp.tanh(x + 2.0 * t - 0.3)
    v = jnp.tanh(0.5 * x - t)
    return jnp.concatenate([eps, v], axis=-1)


def _np_out(x_nchw: np.ndarray, t: float) -> np.ndarray:
    eps = 0.95 * x_nchw + 0.2 * np.tanh(x_nchw + 2.0 * t - 0.3)
    v = np.tanh(0.5 * x_nchw - t)
    return np.concatenate([eps, v], axis=1)


def test_schedule_matches_diffusers_and_respacing_matches_dit():
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    np.testing.assert_allclose(ddpm.alphas_cumprod(DDPM), ref.alphas_cumprod.double().numpy(), rtol=1e-6)
    steps = ddpm.respaced_timesteps(1000, 250)
    assert steps[0] == 0 and steps[-1] == 999 and len(set(steps.tolist())) == 250
    # DiT's space_timesteps(1000, "10"): stride 999/9 = 111.
    np.testing.assert_array_equal(ddpm.respaced_timesteps(1000, 10), np.arange(10) * 111)
    with pytest.raises(ValueError):
        ddpm.respaced_timesteps(1000, 1)


def _patched_noise(monkeypatch, module, rng, shape):
    """diffusers draws its step noise with randn_tensor; hand it the noise our sampler draws."""
    calls = iter(range(10_000))

    def fake_randn(shape_, generator=None, device=None, dtype=None, **_):
        i = next(calls)
        z = np.asarray(jax.random.normal(jax.random.fold_in(rng, i), shape, jnp.float32))
        return torch.from_numpy(z.transpose(0, 3, 1, 2).copy())

    monkeypatch.setattr(module, "randn_tensor", fake_randn)


def test_ddpm_learned_sigma_sampler_matches_diffusers(monkeypatch):
    num_steps = 25
    cfg = SamplerConfig(method="ddpm", num_steps=num_steps)
    noise = jax.random.normal(jax.random.key(0), (B, H, W, C))
    rng = jax.random.key(7)
    got = sample(FnModel(_toy_out), noise, None, cfg, flow=DDPM, rng=rng)

    from diffusers.schedulers import scheduling_ddpm

    _patched_noise(monkeypatch, scheduling_ddpm, rng, (B, H, W, C))
    steps = ddpm.respaced_timesteps(1000, num_steps)[::-1].tolist()
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range", clip_sample=False
    )
    ref.set_timesteps(timesteps=steps)
    x = torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())
    for t in ref.timesteps:
        out = torch.from_numpy(_np_out(x.numpy(), float(t) / 1000).astype(np.float32))
        x = ref.step(out, t, x).prev_sample
    want = x.numpy().transpose(0, 2, 3, 1)
    assert np.abs(want - np.asarray(noise)).max() > 0.5 and np.abs(want).max() < 20  # it moved, stayed bounded
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_ddim_sampler_matches_diffusers():
    # DiT's respacing of 10 steps has stride 111 = 1000 // 9, diffusers' DDIM stride for 9 steps.
    cfg = SamplerConfig(method="ddim", num_steps=10)
    noise = jax.random.normal(jax.random.key(1), (B, H, W, C))
    got = sample(FnModel(_toy_out), noise, None, cfg, flow=DDPM)

    ref = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True
    )
    ref.set_timesteps(9)
    x = torch.from_numpy(np.asarray(noise).transpose(0, 3, 1, 2).copy())
    for t in ddpm.respaced_timesteps(1000, 10)[::-1]:
        eps = torch.from_numpy(_np_out(x.numpy(), t / 1000)[:, :C].astype(np.float32))
        x = ref.step(eps, int(t), x, eta=0.0).prev_sample
    np.testing.assert_allclose(np.asarray(got), x.numpy().transpose(0, 2, 3, 1), atol=1e-4)


def test_ddpm_guidance_mixes_eps_and_keeps_conditional_variance():
    # A model whose eps is its label and whose variance value is minus it: guided eps = u + s (c - u)
    # (u from the null class 5); the variance channels are the conditional pass's, as in DiT.
    def fn(x, t, y):
        e = jnp.broadcast_to(y[:, None, None, None].astype(jnp.float32), x.shape)
        return jnp.concatenate([e, -e], axis=-1)

    from jax_mmdit.flow import guided_model

    y, zeros = jnp.array([1, 2]), jnp.zeros((B, H, W, C))
    label = np.array([1.0, 2.0])[:, None, None, None]
    f = guided_model(fn, y, SamplerConfig(method="ddpm", num_steps=2, cfg_scale=3.0), 5, B, C)
    out = np.asarray(f(zeros, 0.5))
    np.testing.assert_allclose(out[..., :C], np.broadcast_to(5 + 3.0 * (label - 5), (B, H, W, C)))
    np.testing.assert_allclose(out[..., C:], np.broadcast_to(-label, (B, H, W, C)))
    # cfg_channels=1 (DiT's "first 3 of 4" in miniature): channel 1 stays conditional.
    cfg1 = SamplerConfig(method="ddpm", num_steps=2, cfg_scale=3.0, cfg_channels=1)
    out1 = np.asarray(guided_model(fn, y, cfg1, 5, B, C)(zeros, 0.5))
    np.testing.assert_allclose(out1[..., 0], out[..., 0])
    np.testing.assert_allclose(out1[..., 1], np.broadcast_to(label[..., 0], (B, H, W)))


def test_ddpm_loss_is_zero_for_the_oracle_and_positive_otherwise():
    x = jax.random.uniform(jax.random.key(2), (16, H, W, C), minval=-1, maxval=1)
    ac = jnp.asarray(ddpm.alphas_cumprod(DDPM), jnp.float32)
    seen = []

    def oracle(v_value):
        def model(xt, t_B, y):
            step = jnp.round(t_B * 1000).astype(jnp.int32)
            seen.append(t_B)
            a = ac[step][:, None, None, None]
            eps = (xt - jnp.sqrt(a) * x) / jnp.sqrt(1 - a)
            return jnp.concatenate([eps, jnp.full_like(eps, v_value)], axis=-1)

        return model

    loss_fn = make_loss_fn(DDPM, None)
    rng = jax.random.key(3)
    t_B = ddpm.sample_timesteps(jax.random.fold_in(rng, 0), 16, DDPM)
    assert int(jnp.min(jnp.floor(t_B * 1000))) > 0  # this seed draws no t = 0 (its loss is a likelihood)
    # v = -1 is the true posterior variance, and the oracle's eps gives the true mean: KL 0, MSE 0.
    loss, aux = loss_fn(oracle(-1.0), x, None, rng)
    assert float(loss) < 1e-4
    np.testing.assert_allclose(np.asarray(seen[0]) * 1000, np.round(np.asarray(seen[0]) * 1000), atol=1e-3)
    assert float(aux["loss_bin_count"].sum()) == 16
    wrong, _ = loss_fn(oracle(1.0), x, None, rng)  # the variance beta instead: the bound is positive
    assert float(wrong) > 10 * float(loss) + 1e-3


def test_ddpm_bound_does_not_train_the_mean():
    x = jax.random.uniform(jax.random.key(4), (8, H, W, C), minval=-1, maxval=1)
    loss_fn = make_loss_fn(DDPM, None)

    def loss_at(s_eps, s_var, with_var=True):
        def model(xt, t, y):
            eps = _toy_out(xt * s_eps, t)[..., :C]
            return jnp.concatenate([eps, _toy_out(xt * s_var, t)[..., C:]], -1) if with_var else eps

        return loss_fn(model, x, None, jax.random.key(5))[0]

    g_eps, g_var = jax.grad(loss_at, argnums=(0, 1))(1.0, 1.0)
    # The eps channels' gradient is the MSE's alone: the same as for a model without a variance.
    g_eps_mse_only = jax.grad(lambda s: loss_at(s, 1.0, with_var=False))(1.0)
    np.testing.assert_allclose(float(g_eps), float(g_eps_mse_only), rtol=1e-5)
    assert float(g_var) != 0.0  # the variance channels are trained by the bound (small: at most t the range is narrow)


def test_sit_convention_on_an_exact_velocity_reproduces_the_data():
    # SiT: x_s = s x1 + (1 - s) x0 with data x1 ~ N(mu, sd^2), noise x0 ~ N(0, 1), the model predicts
    # E[x1 - x0 | x_s] and sees s (data at s = 1). Derived in SiT's own terms: with a = s, b = 1 - s,
    # Var(x_s) = a^2 sd^2 + b^2, E[x1|x_s] = mu + a sd^2 / Var (x_s - a mu), E[x0|x_s] = b / Var (x_s - a mu).
    mu, sd = 1.5, 0.4

    def sit_velocity(x, s_B, y):
        a = s_B[:, None, None, None]
        b = 1 - a
        var = a**2 * sd**2 + b**2
        return (mu + a * sd**2 / var * (x - a * mu)) - b / var * (x - a * mu)

    noise = jax.random.normal(jax.random.key(6), (512, 2, 2, 1))
    cfg = SamplerConfig(method="heun", num_steps=32)
    x0 = np.asarray(sample(FnModel(sit_velocity), noise, None, cfg, flow=FlowConfig(objective="sit")))
    # The exact ODE maps noise z to mu + sd z.
    np.testing.assert_allclose(x0, mu + sd * np.asarray(noise), atol=0.02)
    # Read in our convention instead, the same field goes the wrong way.
    wrong = np.asarray(sample(FnModel(sit_velocity), noise, None, cfg))
    assert np.abs(wrong - (mu + sd * np.asarray(noise))).max() > 0.5


def test_sit_loss_is_ours_in_sit_time():
    x = jax.random.normal(jax.random.key(8), (4, H, W, C))
    rng = jax.random.key(9)
    ours = lambda xt, t, y: jnp.tanh(xt) * t[:, None, None, None]  # noqa: E731
    as_sit = lambda xt, s, y: -ours(xt, 1 - s, y)  # noqa: E731
    a = make_loss_fn(FlowConfig(), None)(ours, x, None, rng)[0]
    b = make_loss_fn(FlowConfig(objective="sit"), None)(as_sit, x, None, rng)[0]
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    assert math.isfinite(float(a))


def test_samplers_must_fit_the_objective():
    from jax_mmdit.config import TrainConfig

    with pytest.raises(UserError, match="ddpm"):
        TrainConfig(flow=DDPM)  # the default sampler is Euler
    with pytest.raises(UserError, match="objective 'ddpm'"):
        TrainConfig(sampler=SamplerConfig(method="ddim"))
    with pytest.raises(UserError, match="shift"):
        SamplerConfig(method="ddpm", shift=3.0)
    TrainConfig(flow=DDPM, sampler=SamplerConfig(method="ddpm", num_steps=250))
