"""oneDNN custom calls (matmul, linear layers, fused attention): parity with XLA and float64 references,
gradients, FLOP counting, fallback.

The suite runs on 8 fake CPU devices, where MMDIT_ONEDNN's default ("auto") stays off; these
tests switch it on explicitly (single-device jits) and fail if the kernel cannot be built: CI
installs g++ and libdnnl-dev through `make setup`.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mmdit.kernels import onednn
from jax_mmdit.models import attention, layers


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
    if dtype == jnp.bfloat16:  # a bf16 result is the float32 one, rounded once
        got16 = jax.jit(functools.partial(onednn.matmul, transpose_a=ta, transpose_b=tb, out_dtype=dtype))(a, b)
        assert got16.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got16, np.float32), np.asarray(got.astype(jnp.bfloat16), np.float32))


def test_matmul_rejects_bad_operands(use_onednn):
    with pytest.raises(ValueError, match="cannot multiply"):
        onednn.matmul(jnp.zeros((4, 3)), jnp.zeros((4, 5)))
    with pytest.raises(TypeError, match="float32 or two bfloat16"):
        onednn.matmul(jnp.zeros((4, 3)), jnp.zeros((3, 5), jnp.bfloat16))
    with pytest.raises(TypeError, match="returns float32 or the operands' dtype"):
        onednn.matmul(jnp.zeros((4, 3)), jnp.zeros((3, 5)), out_dtype=jnp.bfloat16)


def _dense_and_attention_grads(dtype, mode, monkeypatch):
    monkeypatch.setenv(onednn.ENV, mode)
    x, w, b = _rand((64, 48), jnp.float32, 2), _rand((48, 40), jnp.float32, 3), _rand((40,), jnp.float32, 10)
    q, k, v = (_rand((2, 3, 16, 8), dtype, s) for s in (4, 5, 6))
    use = mode == "on"

    r = _rand((64, 40), jnp.float32, 11)

    def loss(x, w, b, q, k, v):
        # Linear in the dense outputs (a fixed random cotangent): the oneDNN path rounds them to bf16,
        # which a curved loss like sin would amplify into gradient differences.
        d = jnp.sum(layers.dense(x, w, b, dtype) * r) + jnp.sum(layers.dense_gelu(x, w, b, dtype) * r)
        a = jnp.sum(jnp.sin(attention._softmax_attention(q, k, v, use).astype(jnp.float32)))
        return d + a

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)))(x, w, b, q, k, v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_and_attention_gradients_match_xla_path(dtype, monkeypatch):
    val_on, grads_on = _dense_and_attention_grads(dtype, "on", monkeypatch)
    val_off, grads_off = _dense_and_attention_grads(dtype, "off", monkeypatch)
    # In bf16 the oneDNN dense layers round their outputs to bf16 (XLA's return float32): ~1e-3.
    np.testing.assert_allclose(float(val_on), float(val_off), rtol=3e-3 if dtype == jnp.bfloat16 else 1e-5)
    for g_on, g_off in zip(grads_on, grads_off):
        assert g_on.dtype == g_off.dtype
        # bf16: gradients rounded to bf16 from f32 sums in a different order, and the GELU's
        # cotangent from a bf16-rounded pre-activation: ~1 ulp of the largest entries.
        g_on, g_off = np.asarray(g_on, np.float32), np.asarray(g_off, np.float32)
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
        assert np.abs(g_on - g_off).max() <= tol * np.abs(g_off).max()


def _gelu_tanh64(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gelu", [False, True])
def test_linear_kernels_match_float64_reference(use_onednn, dtype, gelu):
    # M, K, N not multiples of 16, a bias that matters, weights given in float32 (cast inside).
    x, w, b = _rand((37, 24), dtype, 13), _rand((24, 50), jnp.float32, 14) * 0.3, _rand((50,), jnp.float32, 15)
    g = _rand((37, 50), jnp.float32, 16)
    f = layers._onednn_dense_gelu if gelu else layers._onednn_dense
    y, vjp = jax.vjp(f, x, w, b)
    dx, dw, db = vjp(g.astype(y.dtype))
    assert y.dtype == dtype and (dx.dtype, dw.dtype, db.dtype) == (dtype, jnp.float32, jnp.float32)

    # float64 reference on the operands the kernel sees (w rounded to the compute dtype).
    x64, w64, g64 = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64) for a in (x, w, g))
    b64 = np.asarray(b, np.float64)  # the bias stays float32
    z64 = x64 @ w64 + b64
    y64 = _gelu_tanh64(z64) if gelu else z64
    eps = 1e-6
    dz64 = g64 * ((_gelu_tanh64(z64 + eps) - _gelu_tanh64(z64 - eps)) / (2 * eps) if gelu else 1.0)
    want = {"y": y64, "dx": dz64 @ w64.T, "dw": x64.T @ dz64, "db": dz64.sum(0)}
    got = {"y": y, "dx": dx, "dw": dw, "db": db}
    # bf16: z rounded before the GELU, dz rounded before the matmuls (a few bf16 ulps).
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    for name, ref in want.items():
        err = np.abs(np.asarray(got[name], np.float64) - ref).max() / np.abs(ref).max()
        assert err < tol, (name, err)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_backward_by_blocks_of_rows_matches_float64(use_onednn, dtype):
    # Tall enough that every OpenMP thread (at most one per CPU) gets blocks of rows (512 at most):
    # the kernel then sums per-thread partial weight and bias gradients. An odd M gives threads
    # and blocks of unequal sizes.
    M = 512 * (os.cpu_count() or 1) + 37
    x, w, dz = _rand((M, 24), dtype, 40), _rand((24, 48), dtype, 41), _rand((M, 48), dtype, 42)
    dx, dw, db = onednn.dense_backward(x, w, dz)
    x64, w64, dz64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, w, dz))
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5  # bf16: dx rounded once; dW, db float32
    for got, ref in ((dx, dz64 @ w64.T), (dw, x64.T @ dz64), (db, dz64.sum(0))):
        err = np.abs(np.asarray(got.astype(jnp.float32), np.float64) - ref).max() / np.abs(ref).max()
        assert err < tol, err
    assert dw.dtype == db.dtype == jnp.float32 and dx.dtype == dtype


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 40), (257, 33)])  # fewer rows than threads; odd sizes
def test_column_sum_matches_float64(use_onednn, dtype, shape):
    z = _rand(shape, dtype, 30)
    got = onednn.column_sum(z)
    want = np.asarray(z.astype(jnp.float32), np.float64).sum(0)
    assert got.dtype == jnp.float32 and got.shape == shape[1:]
    assert np.abs(np.asarray(got, np.float64) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    with pytest.raises(ValueError, match=r"\(M, N\)"):
        onednn.column_sum(z.reshape(-1))


def test_linear_kernels_reject_bad_operands(use_onednn):
    x, w, b = jnp.zeros((4, 3)), jnp.zeros((3, 5)), jnp.zeros((5,))
    with pytest.raises(ValueError, match=r"x \(M, K\), w \(K, N\), b \(N,\)"):
        onednn.linear(x, w, jnp.zeros((4,)))
    with pytest.raises(ValueError, match="x \\(M, K\\)"):
        onednn.linear_gelu(x, jnp.zeros((4, 5)), b)
    with pytest.raises(TypeError, match="one dtype"):
        onednn.linear(x, w.astype(jnp.bfloat16), b)
    with pytest.raises(ValueError, match="one shape and dtype"):
        onednn.gelu_backward(jnp.zeros((4, 5)), jnp.zeros((4, 5), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"dz \(M, N\)"):
        onednn.dense_backward(x, w, jnp.zeros((4, 4)))
    with pytest.raises(TypeError, match="one dtype"):
        onednn.dense_backward(x, w, jnp.zeros((4, 5), jnp.bfloat16))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_adaln_kernels_match_float64_and_the_xla_path(use_onednn, dtype):
    # D not a multiple of the vector width, an odd batch over two threads, rows off zero mean.
    B, L, D = 3, 5, 37
    x = _rand((B, L, D), jnp.float32, 20) * 2.0 + 3.0
    shift, scale = _rand((B, D), jnp.float32, 21), _rand((B, D), jnp.float32, 22) * 0.5
    dh = _rand((B, L, D), dtype, 23)
    h, vjp = jax.vjp(lambda *a: layers.ln_modulate(*a, dtype), x, shift, scale)
    assert h.dtype == dtype
    assert onednn.ADALN_FWD in jax.jit(lambda *a: layers.ln_modulate(*a, dtype)).lower(x, shift, scale).as_text()
    grads = vjp(dh)

    x64, sh64, sc64 = (np.asarray(a, np.float64) for a in (x, shift, scale))
    xhat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + layers.NORM_EPS)
    h64 = xhat * (1 + sc64[:, None]) + sh64[:, None]
    tol = 8e-3 if dtype == jnp.bfloat16 else 1e-5  # bf16: h rounded once (2^-8 relative)
    assert np.abs(np.asarray(h, np.float64) - h64).max() / np.abs(h64).max() < tol

    # Gradients against XLA's autodiff of the reference formula (same dh, float32).
    _, vjp_xla = jax.vjp(lambda x, sh, sc: (layers.layer_norm(x) * (1 + sc[:, None]) + sh[:, None]).astype(dtype),
                         x, shift, scale)
    for name, got, want in zip(("dx", "dshift", "dscale"), grads, vjp_xla(dh)):
        assert got.dtype == jnp.float32
        err = np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
        assert err < 1e-5, (name, err)


def test_adaln_kernels_reject_bad_operands(use_onednn):
    x, s = jnp.zeros((2, 3, 4)), jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=r"x \(B, L, D\) and scale \(B, D\)"):
        onednn.adaln_forward(x, s, jnp.zeros((3, 4)), jnp.float32, 1e-6)
    with pytest.raises(TypeError, match="float32 x"):
        onednn.adaln_forward(x.astype(jnp.bfloat16), s, s, jnp.float32, 1e-6)
    with pytest.raises(ValueError, match="dh must be like x"):
        onednn.adaln_backward(x, s, jnp.zeros((2, 3, 5)), 1e-6)



@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_residual_backward_matches_float64(use_onednn, dtype):
    # D not a multiple of the vector width, an odd batch over two threads.
    B, L, D = 3, 5, 37
    x, dy = _rand((B, L, D), jnp.float32, 24), _rand((B, L, D), jnp.float32, 25)
    gate, a = _rand((B, D), jnp.float32, 26), _rand((B, L, D), dtype, 27)
    y, vjp = jax.vjp(layers.gated_residual, x, gate, a)
    assert onednn.GATED_RESIDUAL_BWD in jax.jit(lambda *p: jax.vjp(layers.gated_residual, *p)[1](dy)).lower(x, gate, a).as_text()
    dx, dgate, da = vjp(dy)
    assert y.dtype == jnp.float32 and (dx.dtype, dgate.dtype, da.dtype) == (jnp.float32, jnp.float32, dtype)
    x64, dy64, g64, a64 = (np.asarray(jnp.asarray(v).astype(jnp.float32), np.float64) for v in (x, dy, gate, a))
    np.testing.assert_allclose(np.asarray(y), x64 + g64[:, None] * a64, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(dy))
    np.testing.assert_allclose(np.asarray(dgate), (dy64 * a64).sum(1), rtol=1e-5, atol=1e-5)
    # da rounded once to a's dtype.
    tol = 4e-3 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(np.asarray(da, np.float64), g64[:, None] * dy64, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match=r"gate \(B, D\), a and dy \(B, L, D\)"):
        onednn.gated_residual_backward(gate[:, :4], a, dy)
    with pytest.raises(TypeError, match="float32 gate and dy"):
        onednn.gated_residual_backward(gate, a, dy.astype(jnp.bfloat16))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_kernels_match_float64_and_the_xla_path(use_onednn, dtype, monkeypatch):
    from flax import nnx

    # MMDiT's QK-norm on (B, L, H, D) heads; D not a multiple of the vector width, odd row count.
    x = _rand((3, 5, 2, 37), dtype, 40) * 2.0
    dy = _rand((3, 5, 2, 37), dtype, 41)
    norm = layers.RMSNorm(37)
    norm.scale[...] = 1.0 + 0.3 * _rand((37,), jnp.float32, 42)
    graphdef, params = nnx.split(norm)

    def run(mode):
        monkeypatch.setenv(onednn.ENV, mode)
        f = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
        assert (onednn.RMS_NORM_FWD in jax.jit(f).lower(params, x).as_text()) == (mode == "on")
        y, vjp = jax.vjp(f, params, x)
        return y, vjp(dy)

    y, (dparams, dx) = run("on")
    assert y.dtype == dtype and dx.dtype == dtype
    x64, s64 = np.asarray(x.astype(jnp.float32), np.float64), np.asarray(norm.scale[...], np.float64)
    y64 = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + layers.NORM_EPS) * s64
    tol = 8e-3 if dtype == jnp.bfloat16 else 1e-6  # bf16: y rounded once
    assert np.abs(np.asarray(y, np.float64) - y64).max() / np.abs(y64).max() < tol
    # Gradients against XLA's autodiff of the module's own formula (same dy).
    _, (dparams_x, dx_x) = run("off")
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5  # bf16: dx rounded; dscale summed in another order
    for got, want in ((dx, dx_x), (dparams["scale"][...], dparams_x["scale"][...])):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.abs(got - want).max() / np.abs(want).max() < tol
    with pytest.raises(ValueError, match=r"x \(rows, D\)"):
        onednn.rms_norm_forward(x.reshape(-1, 37), jnp.ones((36,)), 1e-6)
    with pytest.raises(ValueError, match="dy must be like x"):
        onednn.rms_norm_backward(x.reshape(-1, 37), jnp.ones((37,)), dy.reshape(-1, 37)[:4], 1e-6)

def _attention_reference(q, k, v):
    """float64 softmax attention on (B, L, H, D) inputs."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("blhd,bshd->bhls", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhls,bshd->blhd", p, v)


# (B, L, S, H, D): query and key lengths differ (MMDiT-like), a head size that is not 64, one head,
# and short sequences over many heads (the kernel then batches 8 heads per unit).
ATTENTION_SHAPES = [(2, 24, 40, 3, 16), (3, 17, 17, 1, 64), (16, 9, 9, 4, 8)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_attention_matches_float64_reference(use_onednn, shape, dtype):
    B, L, S, H, D = shape
    q, k, v = _rand((B, L, H, D), dtype, 1), _rand((B, S, H, D), dtype, 2), _rand((B, S, H, D), dtype, 3)
    do = _rand((B, L, H, D), dtype, 4)
    o = jax.jit(onednn.attention_forward)(q, k, v)
    grads = jax.jit(onednn.attention_backward)(q, k, v, do)
    assert o.dtype == dtype and o.shape == q.shape
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape] and all(g.dtype == dtype for g in grads)

    # Gradients of sum(o * do) through float64 autodiff of the reference.
    with jax.enable_x64():
        args = [jnp.asarray(np.asarray(a, np.float64)) for a in (q, k, v)]

        def ref(q, k, v):
            s = jnp.einsum("blhd,bshd->bhls", q, k) / np.sqrt(D)
            return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(s, axis=-1), v)

        o_ref, vjp = jax.vjp(ref, *args)
        grads_ref = vjp(jnp.asarray(np.asarray(do, np.float64)))
    np.testing.assert_allclose(o_ref, _attention_reference(q, k, v), rtol=1e-12, atol=1e-12)
    # float32: 1e-7-level errors measured; bfloat16: the inputs are exact, the result, the
    # probabilities and ds are rounded to bf16 (~2-4e-3 of the largest value measured).
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    for got, want in zip((o, *grads), (o_ref, *grads_ref)):
        want = np.asarray(want)
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
        assert err < tol


def test_fused_attention_is_what_auto_attention_runs_and_matches_the_xla_path(use_onednn):
    q, k, v = (_rand((2, 16, 3, 8), jnp.float32, s) for s in (5, 6, 7))

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention.attention(q, k, v, impl)))

    fused = jax.jit(jax.value_and_grad(loss("auto"), argnums=(0, 1, 2)))
    text = fused.lower(q, k, v).compile().as_text()
    assert onednn.ATTENTION_FWD in text and onednn.ATTENTION_BWD in text
    (val_f, grads_f), (val_x, grads_x) = fused(q, k, v), jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(val_f, val_x, rtol=1e-5)
    for g_f, g_x in zip(grads_f, grads_x):
        np.testing.assert_allclose(g_f, g_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_self_attention_is_the_fused_attention_of_its_slots(use_onednn, dtype):
    # Short sequences over many heads (8 heads per unit) and one head per unit.
    for B, L, H, D in ((16, 9, 4, 8), (2, 40, 3, 16)):
        qkv, do = _rand((B, L, 3, H, D), dtype, 11), _rand((B, L, H, D), dtype, 12)
        q, k, v = (qkv[:, :, i] for i in range(3))
        o = jax.jit(onednn.attention_packed_forward)(qkv)
        dqkv = jax.jit(onednn.attention_packed_backward)(qkv, do)
        assert o.dtype == dtype and dqkv.dtype == dtype and dqkv.shape == qkv.shape
        # The same units and primitives, only the rows are gathered from (and scattered to) the
        # packed array: bit-identical to the unpacked kernels.
        np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(onednn.attention_forward(q, k, v), np.float32))
        want = jnp.stack(onednn.attention_backward(q, k, v, do), axis=2)
        np.testing.assert_array_equal(np.asarray(dqkv, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_joint_attention_is_the_fused_attention_of_the_concatenated_streams(use_onednn, dtype):
    # An image stream and a context stream (one context token, and several), grouped heads.
    for B, L, T, H, D in ((3, 16, 5, 3, 8), (2, 9, 1, 2, 16)):
        x = tuple(_rand((B, L, H, D), dtype, 50 + i) for i in range(3))
        c = tuple(_rand((B, T, H, D), dtype, 60 + i) for i in range(3))
        do_x, do_c = _rand((B, L, H, D), dtype, 70), _rand((B, T, H, D), dtype, 71)
        o_x, o_c = jax.jit(onednn.attention_joint_forward)(x, c)
        (dx, dc) = jax.jit(onednn.attention_joint_backward)(x, c, do_x, do_c)
        cat = [jnp.concatenate([a, b], axis=1) for a, b in zip(x, c)]
        # The same units and primitives over the same rows, gathered from two arrays: bit-identical.
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        np.testing.assert_array_equal(f32(jnp.concatenate([o_x, o_c], 1)), f32(onednn.attention_forward(*cat)))
        want = onednn.attention_backward(*cat, jnp.concatenate([do_x, do_c], 1))
        for got_x, got_c, w in zip(dx, dc, want):
            assert got_x.dtype == dtype and got_c.shape == (B, T, H, D)
            np.testing.assert_array_equal(f32(jnp.concatenate([got_x, got_c], 1)), f32(w))
    with pytest.raises(ValueError, match="differ in batch, heads or head size"):
        onednn.attention_joint_forward(x, tuple(a[:1] for a in c))
    with pytest.raises(ValueError, match="do of each stream"):
        onednn.attention_joint_backward(x, c, do_x, do_x)


def test_dit_self_attention_reads_the_packed_projection_and_matches_the_xla_path(use_onednn):
    from flax import nnx

    attn = attention.QKV(48, 3, False, jnp.float32, nnx.Rngs(0))
    graphdef, params = nnx.split(attn)
    h = _rand((2 * 16, 48), jnp.float32, 13)

    def loss(impl):
        return lambda p, h: jnp.sum(jnp.sin(nnx.merge(graphdef, p).self_attention(h, 2, impl)))

    packed = jax.jit(jax.value_and_grad(loss("auto"), argnums=(0, 1)))
    text = packed.lower(params, h).compile().as_text()
    assert onednn.ATTENTION_PACKED_FWD in text and onednn.ATTENTION_PACKED_BWD in text
    assert "concatenate" not in text  # the gradient comes out packed
    (val_p, grads_p), (val_x, grads_x) = packed(params, h), jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1)))(params, h)
    np.testing.assert_allclose(val_p, val_x, rtol=1e-5)
    for g_p, g_x in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(g_p, g_x, rtol=1e-4, atol=1e-5)


def test_fused_attention_rejects_bad_operands(use_onednn):
    q = jnp.zeros((2, 8, 3, 16), jnp.float32)
    with pytest.raises(TypeError, match="one dtype"):
        onednn.attention_forward(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match=r"\(B, L, H, D\)"):
        onednn.attention_forward(q, jnp.zeros((2, 8, 3, 8), jnp.float32), jnp.zeros((2, 8, 3, 8), jnp.float32))
    with pytest.raises(ValueError, match="do must be like q"):
        onednn.attention_backward(q, q, q, q[:, :4])
    with pytest.raises(ValueError, match=r"\(B, L, 3, H, D\)"):
        onednn.attention_packed_forward(jnp.zeros((2, 8, 2, 3, 16), jnp.float32))
    with pytest.raises(ValueError, match="do must be"):
        onednn.attention_packed_backward(jnp.zeros((2, 8, 3, 3, 16), jnp.float32), q[:, :4])


def test_attention_kernels_are_counted_as_model_flops(use_onednn):
    from jax_mmdit.train import profiler

    B, L, S, H, D = 2, 24, 40, 3, 16
    q, kv = _rand((B, L, H, D), jnp.float32, 1), _rand((B, S, H, D), jnp.float32, 2)
    # sum(o * c) with a constant c: no other FLOP-heavy op. value_and_grad: the gradient alone
    # does not need the forward's output, and XLA drops the forward call.
    c = _rand((B, L, H, D), jnp.float32, 3)
    f = jax.value_and_grad(lambda q, kv: jnp.sum(attention.attention(q, kv, kv, "auto").reshape(q.shape) * c), argnums=(0, 1))
    compiled = jax.jit(f).lower(q, kv).compile()
    attention_flops = onednn.hlo_flops(compiled.as_text())
    assert attention_flops == (4 + 8) * B * H * L * S * D  # forward 2 matmuls, backward 4
    assert profiler.compiled_flops(compiled) >= attention_flops
    # Self-attention on the packed projection: S = L.
    qkv, c = _rand((B, L, 3, H, D), jnp.float32, 4), _rand((B, L, H, D), jnp.float32, 5)
    f = jax.value_and_grad(lambda qkv: jnp.sum(attention._onednn_self_attention(qkv) * c))
    text = jax.jit(f).lower(qkv).compile().as_text()
    assert onednn.ATTENTION_PACKED_FWD in text and onednn.ATTENTION_PACKED_BWD in text
    assert onednn.hlo_flops(text) == (4 + 8) * B * H * L * L * D
    # Joint attention over two streams of L and S tokens: one sequence of L + S.
    x, c = (qkv[:, :, 0],) * 3, (kv,) * 3
    f = jax.value_and_grad(lambda x, c: sum(jnp.sum(o) for o in attention._onednn_joint_attention(x, c)), argnums=(0, 1))
    text = jax.jit(f).lower(x, c).compile().as_text()
    assert onednn.ATTENTION_JOINT_FWD in text and onednn.ATTENTION_JOINT_BWD in text
    assert onednn.hlo_flops(text) == (4 + 8) * B * H * (L + S) ** 2 * D


def test_custom_calls_are_counted_in_flops(monkeypatch):
    from jax_mmdit.train import profiler

    x, w, b = _rand((64, 48), jnp.bfloat16, 7), _rand((48, 40), jnp.float32, 8), _rand((40,), jnp.float32, 12)
    q = _rand((2, 3, 16, 8), jnp.bfloat16, 9)

    def f(x, w, b, q):
        # sin: XLA would otherwise simplify the gradient of a plain sum of a dot away; 2w: it would
        # compute x @ w once for both layers.
        y = jnp.sum(jnp.sin(layers.dense(x, w, b, jnp.bfloat16) + layers.dense_gelu(x, 2 * w, b, jnp.bfloat16)))
        return y + jnp.sum(jnp.sin(attention.attention(q, q, q, "auto")))

    counts = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(onednn.ENV, mode)
        compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3))).lower(x, w, b, q).compile()
        counts[mode] = profiler.compiled_flops(compiled)
        text = compiled.as_text()
        assert all((t in text) == (mode == "on") for t in (onednn.DENSE_BWD, onednn.LINEAR, onednn.LINEAR_GELU))
        kernel_flops = onednn.hlo_flops(text)
    # 6 dense matmuls (64x48x40) + 6 attention matmuls (2x16 heads of 3x3x8), x2 FLOPs: exactly the
    # kernels' count (the bias gradients' column sums are not matmuls). XLA also counts softmax's
    # and the GELU's elementwise work, which the kernels' counts leave out (7% of these tiny
    # matmuls' FLOPs), and in the "on" program the rest.
    matmul_flops = 2 * (6 * 64 * 48 * 40 + 6 * 2 * 16 * 3 * 3 * 8)
    assert kernel_flops == matmul_flops
    assert counts["off"] > matmul_flops and counts["on"] > matmul_flops
    assert counts["on"] == pytest.approx(counts["off"], rel=0.1)


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



@pytest.mark.parametrize("arch", ["dit", "mmdit"])
def test_model_gradients_with_the_kernels_match_xla(arch, monkeypatch):
    # Every kernel a model uses, through the models' own code paths: DiT takes the packed
    # self-attention; MMDiT (text-conditioned: a context stream with its own gated residuals, and
    # QK-norm) the joint attention over both streams; both the gated-residual, adaLN and dense
    # kernels. fp32, randomised weights (adaLN-Zero's zero gates would hide the branches).
    from flax import nnx

    from jax_mmdit.models import ModelConfig, create_model

    extra = dict(num_classes=0, context_dim=8, pooled_dim=6, qk_norm=True) if arch == "mmdit" else dict(num_classes=5)
    cfg = ModelConfig(arch=arch, image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, **extra)
    model = create_model(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), p.dtype), params)
    x, t = _rand((2, 8, 8, 3), jnp.float32, 30), jnp.asarray([0.3, 0.8])
    cond = (dict(context_BxTxE=_rand((2, 5, 8), jnp.float32, 31), pooled_BxP=_rand((2, 6), jnp.float32, 32))
            if arch == "mmdit" else dict(y_B=jnp.asarray([1, 4])))

    def loss(p):
        return jnp.mean(jnp.sin(nnx.merge(graphdef, p)(x, t, **cond)))

    results = {}
    for mode in ("off", "on"):
        monkeypatch.setenv(onednn.ENV, mode)
        f = jax.jit(jax.value_and_grad(loss))
        text = f.lower(params).compile().as_text()
        assert (onednn.GATED_RESIDUAL_BWD in text) == (mode == "on")
        assert (onednn.ATTENTION_PACKED_BWD in text) == (mode == "on" and arch == "dit")
        assert (onednn.RMS_NORM_BWD in text) == (mode == "on" and arch == "mmdit")  # QK-norm
        assert (onednn.ATTENTION_JOINT_BWD in text) == (mode == "on" and arch == "mmdit")
        results[mode] = f(params)
    np.testing.assert_allclose(float(results["on"][0]), float(results["off"][0]), rtol=1e-5)
    for g_on, g_off in zip(jax.tree.leaves(results["on"][1]), jax.tree.leaves(results["off"][1])):
        np.testing.assert_allclose(g_on, g_off, rtol=1e-4, atol=1e-5 * float(np.abs(g_off).max() + 1e-6))

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
        text = tr._compiled_step.as_text()
        # What the benchmark reports per row: which of the kernels the compiled step calls.
        expected = {onednn.DENSE_BWD, onednn.ATTENTION_PACKED_BWD, onednn.ADALN_BWD, onednn.GATED_RESIDUAL_BWD}
        calls = onednn.kernel_calls(text)
        assert expected <= calls if mode == "on" else calls == set()
    assert len(set(np.round(losses["off"], 6))) == 3  # the loss moves, so parameters were updated
    np.testing.assert_allclose(losses["on"], losses["off"], rtol=1e-3 if precision == "bf16" else 1e-5)


def test_concurrent_calls_of_one_primitive_do_not_share_a_scratchpad(use_onednn):
    # XLA:CPU runs independent thunks concurrently: here 12 same-shape matmuls (like every block's
    # adaLN modulation), i.e. one cached oneDNN primitive executed from two threads at once. With
    # oneDNN's library-managed scratchpad they shared one buffer and, now and then, corrupted each
    # other's results (the default config's fp32 training diverged).
    xs = _rand((12, 128, 192), jnp.float32, 20)
    ws = _rand((12, 192, 1152), jnp.float32, 21)
    f = jax.jit(lambda xs, ws: [onednn.matmul(xs[i], ws[i]) for i in range(12)])
    want = np.einsum("imk,ikn->imn", np.asarray(xs, np.float64), np.asarray(ws, np.float64))
    for _ in range(20):
        got = np.stack([np.asarray(r) for r in f(xs, ws)])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
