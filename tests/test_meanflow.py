"""MeanFlow: the jvp target against the exact average velocity of Gaussian data and against finite
differences, one-step sampling of the exact field, the guided target, and the objective through
the trainer (sharded, accumulated, remat/bf16, exact resume, `mmdit sample --steps 1`)."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_mmdit.config import MeshConfig, TrainConfig, get_config
from jax_mmdit.errors import UserError
from jax_mmdit.flow import meanflow
from jax_mmdit.flow.config import FlowConfig, MeanFlowConfig, SamplerConfig
from jax_mmdit.models.config import ModelConfig
from jax_mmdit.models.factory import create_model
from jax_mmdit.ops import resolve
from jax_mmdit.train.trainer import Trainer

MU, SIGMA = 0.7, 0.3  # data: every pixel N(MU, SIGMA^2), independent


def s(t):
    """Std of z_t = (1 - t) x + t eps."""
    return jnp.sqrt((1 - t) ** 2 * SIGMA**2 + t**2)


def exact_v(z, t):
    """The marginal velocity E[eps - x | z_t = z]: the ODE keeps xi = (z - (1-t) mu) / s(t) fixed."""
    ds = ((t - 1) * SIGMA**2 + t) / s(t)
    return -MU + ds / s(t) * (z - (1 - t) * MU)


def exact_u(z, t, h):
    """The exact average velocity over [t - h, t] (h > 0): (z_t - z_r) / h along the ODE."""
    r = t - h
    z_r = (1 - r) * MU + s(r) / s(t) * (z - (1 - t) * MU)
    return (z - z_r) / h


def bcast(t_B, z):
    return t_B.reshape(-1, *([1] * (z.ndim - 1)))


def test_jvp_target_equals_the_exact_average_velocity_of_gaussian_data():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    z = jax.random.normal(k1, (16, 4, 4, 1))
    t = jax.random.uniform(k2, (16,), minval=0.3, maxval=1.0)
    r = t * jax.random.uniform(k3, (16,), maxval=0.9)
    u_fn = lambda z_, t_, h_: exact_u(z_, bcast(t_, z_), bcast(h_, z_))  # noqa: E731
    u, u_tgt = meanflow.average_velocity_target(u_fn, z, t, r, exact_v(z, bcast(t, z)))
    np.testing.assert_allclose(u_tgt, u, atol=2e-5)
    # A wrong velocity gives a wrong target: the identity really tests something.
    _, bad = meanflow.average_velocity_target(u_fn, z, t, r, 1.1 * exact_v(z, bcast(t, z)))
    assert float(jnp.max(jnp.abs(bad - u))) > 1e-2


@pytest.mark.parametrize("steps", [1, 2])
def test_one_step_sampling_of_the_exact_field_gives_the_data_distribution(steps):
    noise = jax.random.normal(jax.random.key(1), (4096, 2, 2, 1))
    u4 = lambda z, t_B, h_B, y: exact_u(z, bcast(t_B, z), bcast(h_B, z))  # noqa: E731
    x = meanflow.sample_loop(u4, noise, None, SamplerConfig(method="meanflow", num_steps=steps))
    # The ODE map of Gaussian data is affine: noise eps lands on mu + sigma * eps.
    np.testing.assert_allclose(x, MU + SIGMA * noise, atol=1e-5)
    assert abs(float(x.mean()) - MU) < 0.02 and abs(float(x.std()) - SIGMA) < 0.02


def tiny_model(**kw):
    cfg = ModelConfig(arch="dit", image_size=8, in_channels=1, patch_size=4, hidden_size=32, depth=2,
                      num_heads=2, num_classes=10, interval_embed=True, **kw)  # fmt: skip
    model = create_model(cfg, nnx.Rngs(0), resolve(forward_mode=True))
    # adaLN-Zero starts at a zero output (and zero jvp): move every weight off its init.
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
    return model


def test_jvp_target_matches_finite_differences_on_a_dit():
    # Embedding t itself (not 1000 t) keeps the sinusoids slow enough for a central difference.
    model = tiny_model(time_scale=1.0)
    k1, k2 = jax.random.split(jax.random.key(2))
    z, v = jax.random.normal(k1, (4, 8, 8, 1)), jax.random.normal(k2, (4, 8, 8, 1))
    t, r, y = jnp.array([0.9, 0.7, 0.5, 0.3]), jnp.array([0.2, 0.7, 0.1, 0.0]), jnp.arange(4)
    u_fn = lambda z_, t_, h_: model(z_, t_, y, h_B=h_)  # noqa: E731
    u, u_tgt = meanflow.average_velocity_target(u_fn, z, t, r, v)
    # d/dt along the trajectory: z moves with v, t with 1, r stays (h = t - r moves with 1).
    eps = 1e-3
    du_dt = (u_fn(z + eps * v, t + eps, t + eps - r) - u_fn(z - eps * v, t - eps, t - eps - r)) / (2 * eps)
    fd_tgt = v - bcast(t - r, z) * du_dt
    np.testing.assert_allclose(u_tgt, fd_tgt, atol=2e-3 * float(jnp.max(jnp.abs(fd_tgt))))
    np.testing.assert_array_equal(u_tgt[1], v[1])  # r == t: the plain flow-matching target
    assert float(jnp.max(jnp.abs(u_tgt[0] - v[0]))) > 1e-3  # elsewhere the jvp term matters


def test_guided_target_mixes_the_models_own_velocities_inside_the_interval():
    model = tiny_model()
    m = MeanFlowConfig(omega=1.5, kappa=0.3, guidance_interval=(0.0, 0.6))
    flow = FlowConfig(objective="meanflow", meanflow=m)
    z, v = jax.random.normal(jax.random.key(3), (2, 8, 8, 1)), jnp.ones((2, 8, 8, 1))
    t, y = jnp.array([0.5, 0.8]), jnp.array([3, 4])
    u = meanflow.mean_model(model)
    v_g = meanflow.guided_velocity(u, z, t, y, v, flow, 10, None)
    h0 = jnp.zeros(2)
    v_c, v_u = u(z, t, h0, y), u(z, t, h0, jnp.full(2, 10))
    want = 1.5 * v + 0.3 * v_c + (1 - 1.5 - 0.3) * v_u
    np.testing.assert_allclose(v_g[0], want[0], atol=1e-5)
    np.testing.assert_array_equal(v_g[1], v[1])  # t = 0.8 lies outside the interval


def meanflow_cfg(tmp_path, **kw) -> TrainConfig:
    base = get_config("tiny")
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, interval_embed=True),
        flow=FlowConfig(objective="meanflow", meanflow=MeanFlowConfig(omega=1.0, kappa=0.5)),
        sampler=SamplerConfig(method="meanflow", num_steps=1),
        run_dir=str(tmp_path / "run"),
        **kw,
    )


def losses_of(cfg, devices, n=3):
    tr = Trainer(cfg, devices=devices)
    it = tr.train_data.iterator(cfg.batch_size, seed=cfg.seed)
    return np.asarray(jax.device_get([tr.train_step(next(it))["loss"] for _ in range(n)]))


def test_meanflow_trains_sharded_like_single_device(tmp_path):
    cfg = meanflow_cfg(tmp_path)
    ref = losses_of(dataclasses.replace(cfg, mesh=MeshConfig(data=1)), jax.devices()[:1])
    got = losses_of(dataclasses.replace(cfg, mesh=MeshConfig(data=2, fsdp=4), run_dir=str(tmp_path / "b")),
                    jax.devices()[:8])  # fmt: skip
    assert len(set(np.round(ref, 6))) == 3 and np.all(np.isfinite(ref))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_remat_and_bf16_keep_the_meanflow_loss_and_gradients():
    flow = FlowConfig(objective="meanflow", meanflow=MeanFlowConfig(kappa=0.5))
    loss_fn = meanflow.make_loss_fn(flow, null_class=10)
    x, y = jax.random.normal(jax.random.key(4), (4, 8, 8, 1)), jnp.arange(4)

    def loss_and_grads(**kw):
        model = tiny_model(**kw)
        return nnx.value_and_grad(lambda m_: loss_fn(m_, x, y, jax.random.key(5))[1]["mse"])(model)

    (l32, g32), (lremat, gremat) = loss_and_grads(), loss_and_grads(remat=True)
    np.testing.assert_allclose(lremat, l32, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gremat), jax.tree.leaves(g32)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    lbf16, gbf16 = loss_and_grads(dtype="bfloat16")
    assert np.isfinite(lbf16) and abs(float(lbf16) - float(l32)) < 0.05 * float(l32)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gbf16))


def test_meanflow_resume_is_exact_and_samples_in_one_step_from_the_cli(tmp_path):
    cfg = meanflow_cfg(tmp_path, max_steps=4, log_every=1, sample_every_n=0, eval_save_steps=2)
    straight = Trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "a")))
    straight.train()
    first = Trainer(cfg)
    first.train(until_step=2)
    second = Trainer(cfg)
    second.train()
    ref = [h["train/loss"] for h in straight.history]
    got = [h["train/loss"] for h in first.history + second.history]
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = tmp_path / "one.npz"
    r = subprocess.run([sys.executable, "-m", "jax_mmdit.cli", "sample", "--run", cfg.run_dir, "--num", "4",
                        "--steps", "1", "--out", str(out)], capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "1 meanflow steps" in r.stdout
    images = np.load(out)["images"]
    assert images.shape == (4, 28, 28, 1) and images.std() > 0


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TrainConfig(flow=FlowConfig(objective="meanflow")), "interval_embed go together"),
        (lambda: TrainConfig(model=ModelConfig(interval_embed=True, num_classes=10)), "interval_embed go together"),
        (lambda: FlowConfig(meanflow=MeanFlowConfig(omega=2.0)), "configures the meanflow objective"),
        (lambda: TrainConfig(sampler=SamplerConfig(method="meanflow")), "jumps with an average velocity"),
    ],
)
def test_meanflow_config_mismatches_are_one_sentence(build, message):
    with pytest.raises(UserError, match=message):
        build()


def test_meanflow_refuses_reverse_mode_only_kernels(tmp_path):
    cfg = meanflow_cfg(tmp_path)
    with pytest.raises(UserError, match="reverse-mode"):
        dataclasses.replace(cfg, kernels="onednn")
    with pytest.raises(UserError, match="reverse-mode"):
        dataclasses.replace(cfg, precision="fp8")
