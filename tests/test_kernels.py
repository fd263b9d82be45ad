"""oneDNN matmul custom call: parity with XLA's dots, gradients, FLOP counting, fallback.

The suite runs on 8 fake CPU devices, where MMDIT_ONEDNN's default ("auto") stays off; these
tests switch it on explicitly (single-device jits) and fail if the kernel cannot be built: CI
installs g++ and libdnnl-dev through `make setup`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mmdit.kernels import onednn
from jax_mmdit.models import layers


@pytest.fixture
def use_onednn(monkeypatch):
    monkeypatch.setenv(onednn.ENV, "on")
    assert onednn.enabled()


def _rand(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


CASES = [  # a shape, b shape, transpose_a, transpose_b
    ((40, 24), (24, 56), False, False),
    ((24, 40), (24, 56), True, False),
    ((40, 24), (56, 24), False, True),
    ((24, 40), (56, 24), True, True),
    ((3, 5, 16, 8), (3, 5, 8, 12), False, False),  # batched like attention's p @ v
    ((3, 5, 16, 8), (3, 5, 12, 8), False, True),  # q @ k^T
    ((3, 5, 16, 8), (3, 5, 16, 12), True, False),  # p^T @ do
    ((6, 16, 8), (8, 12), False, False),  # one b for every batch element
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("a_shape,b_shape,ta,tb", CASES)
def test_matmul_matches_xla_dot(use_onednn, dtype, a_shape, b_shape, ta, tb):
    a, b = _rand(a_shape, dtype, 0), _rand(b_shape, dtype, 1)
    got = jax.jit(onednn.matmul, static_argnums=(2, 3))(a, b, ta, tb)
    a_ = jnp.swapaxes(a, -1, -2) if ta else a
    b_ = jnp.swapaxes(b, -1, -2) if tb else b
    want = jnp.matmul(a_.astype(jnp.float32), b_.astype(jnp.float32), precision="highest")
    assert got.dtype == jnp.float32 and got.shape == want.shape
    # bf16 products are exact in f32; only the summation order differs.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_matmul_rejects_bad_operands(use_onednn):
    with pytest.raises(ValueError, match="cannot multiply"):
        onednn.matmul(jnp.zeros((4, 3)), jnp.zeros((4, 5)))
    with pytest.raises(TypeError, match="float32 or two bfloat16"):
        onednn.matmul(jnp.zeros((4, 3)), jnp.zeros((3, 5), jnp.bfloat16))


def _dense_and_attention_grads(dtype, mode, monkeypatch):
    monkeypatch.setenv(onednn.ENV, mode)
    x, w = _rand((64, 48), jnp.float32, 2), _rand((48, 40), jnp.float32, 3)
    q, k, v = (_rand((2, 3, 16, 8), dtype, s) for s in (4, 5, 6))
    use = mode == "on"

    def loss(x, w, q, k, v):
        d = jnp.sum(jnp.sin(layers.matmul(x, w, dtype)))
        a = jnp.sum(jnp.sin(layers._softmax_attention(q, k, v, use).astype(jnp.float32)))
        return d + a

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w, q, k, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_and_attention_gradients_match_xla_path(dtype, monkeypatch):
    val_on, grads_on = _dense_and_attention_grads(dtype, "on", monkeypatch)
    val_off, grads_off = _dense_and_attention_grads(dtype, "off", monkeypatch)
    np.testing.assert_allclose(float(val_on), float(val_off), rtol=1e-5)
    for g_on, g_off in zip(grads_on, grads_off):
        assert g_on.dtype == g_off.dtype
        # bf16 gradients are rounded to bf16 from f32 sums in a different order: 1 ulp apart.
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
        np.testing.assert_allclose(np.asarray(g_on, np.float32), np.asarray(g_off, np.float32), rtol=tol, atol=tol)


def test_custom_calls_are_counted_in_flops(monkeypatch):
    from jax_mmdit.train import profiler

    x, w = _rand((64, 48), jnp.bfloat16, 7), _rand((48, 40), jnp.float32, 8)
    q = _rand((2, 3, 16, 8), jnp.bfloat16, 9)

    def f(x, w, q):
        # sin: XLA would otherwise simplify the gradient of a plain sum of a dot away.
        y = jnp.sum(jnp.sin(layers.matmul(x, w, jnp.bfloat16)))
        return y + jnp.sum(jnp.sin(layers.attention(q, q, q, "auto")))

    counts = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(onednn.ENV, mode)
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2))).lower(x, w, q).compile()
        counts[mode] = profiler.compiled_flops(compiled)
        assert (onednn.TARGET in compiled.as_text()) == (mode == "on")
    # 3 dense matmuls (64x48x40) + 6 attention matmuls (6 heads-batches of 16x16x8), x2 FLOPs.
    matmul_flops = 2 * (3 * 64 * 48 * 40 + 6 * 6 * 16 * 16 * 8)
    assert counts["off"] > matmul_flops
    assert counts["on"] == pytest.approx(counts["off"], rel=0.02)


def test_unbuildable_kernel_falls_back_with_a_warning_or_raises_when_required(monkeypatch, tmp_path):
    monkeypatch.setenv(onednn.CACHE_ENV, str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(jax, "device_count", lambda *a: 1)
    onednn._load.cache_clear()
    onednn._warn_once.cache_clear()
    try:
        monkeypatch.setenv(onednn.ENV, "auto")
        with pytest.warns(UserWarning, match="oneDNN matmuls unavailable.*no C\\+\\+ compiler"):
            assert not onednn.enabled()
        monkeypatch.setenv(onednn.ENV, "on")
        with pytest.raises(RuntimeError, match="MMDIT_ONEDNN=on"):
            onednn.enabled()
        monkeypatch.setenv(onednn.ENV, "sometimes")
        with pytest.raises(ValueError, match="auto, on or off"):
            onednn.enabled()
    finally:
        onednn._load.cache_clear()  # the real kernel loads again for later tests


def test_build_is_cached_per_source_and_jaxlib(monkeypatch, tmp_path):
    monkeypatch.setenv(onednn.CACHE_ENV, str(tmp_path))
    path = onednn.build()
    assert path.parent == tmp_path and path.stat().st_size > 0
    mtime = path.stat().st_mtime_ns
    assert onednn.build() == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


def test_auto_mode_stays_off_on_a_multi_device_mesh(monkeypatch):
    monkeypatch.setenv(onednn.ENV, "auto")
    assert jax.device_count() == 8  # conftest's fake devices
    assert not onednn.enabled()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_steps_on_onednn_match_xla(tmp_path, monkeypatch, precision):
    import dataclasses

    from jax_mmdit.config import MeshConfig, get_config
    from jax_mmdit.train.trainer import Trainer

    losses = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(onednn.ENV, mode)
        cfg = dataclasses.replace(
            get_config("tiny"), run_dir=str(tmp_path / mode), mesh=MeshConfig(data=1, fsdp=1), precision=precision
        )
        tr = Trainer(cfg, devices=jax.devices()[:1])
        it = tr.train_data.iterator(cfg.batch_size, seed=cfg.seed)
        losses[mode] = np.asarray(jax.device_get([tr.train_step(next(it))["loss"] for _ in range(3)]))
        assert (onednn.TARGET in tr._compiled_step.as_text()) == (mode == "on")
    assert len(set(np.round(losses["off"], 6))) == 3  # the loss moves, so parameters were updated
    np.testing.assert_allclose(losses["on"], losses["off"], rtol=1e-3 if precision == "bf16" else 1e-5)
