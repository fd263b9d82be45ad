"""The C++/oneDNN kernels (`jax_mmdit.ops.onednn`): each call against float64 references and
XLA, gradients, FLOP counting, the build and its fallback, and whole models and train steps on
them against XLA.

These tests fail if the kernels cannot be built: CI installs g++ and libdnnl-dev (`make setup`).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mmdit import ops
from jax_mmdit.cache import CACHE_ENV
from jax_mmdit.errors import UserError
from jax_mmdit.ops import XlaCpuOps, reference
from jax_mmdit.ops.onednn import OnednnOps, backend, build, calls

KERNELS, XLA = OnednnOps(), XlaCpuOps()


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert ops.onednn.load() is None, "the C++ kernels must build here (make setup installs g++ and libdnnl-dev)"


def _rand(shape, dtype, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _calls(fn, *args) -> frozenset[str]:
    """The package's kernels the compiled `fn(*args)` calls."""
    return KERNELS.kernel_calls(jax.jit(fn).lower(*args).compile())


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
def test_matmul_matches_xla_dot(dtype, a_shape, b_shape, ta, tb):
    a, b = _rand(a_shape, dtype, 0), _rand(b_shape, dtype, 1)
    got = jax.jit(calls.matmul, static_argnums=(2, 3))(a, b, ta, tb)
    a_ = jnp.swapaxes(a, -1, -2) if ta else a
    b_ = jnp.swapaxes(b, -1, -2) if tb else b
    want = jnp.matmul(a_.astype(jnp.float32), b_.astype(jnp.float32), precision="highest")
    assert got.dtype == jnp.float32 and got.shape == want.shape
    # bf16 products are exact in f32; only the summation order differs.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    if dtype == jnp.bfloat16:  # a bf16 result is the float32 one, rounded once
        got16 = jax.jit(functools.partial(calls.matmul, transpose_a=ta, transpose_b=tb, out_dtype=dtype))(a, b)
        assert got16.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got16, np.float32), np.asarray(got.astype(jnp.bfloat16), np.float32))


def test_matmul_rejects_bad_operands():
    with pytest.raises(ValueError, match="cannot multiply"):
        calls.matmul(jnp.zeros((4, 3)), jnp.zeros((4, 5)))
    with pytest.raises(TypeError, match="float32 or two bfloat16"):
        calls.matmul(jnp.zeros((4, 3)), jnp.zeros((3, 5), jnp.bfloat16))
    with pytest.raises(TypeError, match="returns float32 or the operands' dtype"):
        calls.matmul(jnp.zeros((4, 3)), jnp.zeros((3, 5)), out_dtype=jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_and_attention_gradients_match_xla(dtype):
    x, w, b = _rand((64, 48), jnp.float32, 2), _rand((48, 40), jnp.float32, 3), _rand((40,), jnp.float32, 10)
    q, k, v = (_rand((2, 16, 3, 8), dtype, s) for s in (4, 5, 6))
    r = _rand((64, 40), jnp.float32, 11)

    def loss(o):
        def f(x, w, b, q, k, v):
            # Linear in the dense outputs (a fixed random cotangent): the kernels round them to bf16,
            # which a curved loss like sin would amplify into gradient differences.
            d = jnp.sum(o.dense(x, w, b, dtype) * r) + jnp.sum(o.dense_gelu(x, w, b, dtype) * r)
            return d + jnp.sum(jnp.sin(o.attention(q, k, v).astype(jnp.float32)))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4, 5)))(x, w, b, q, k, v)

    (val_on, grads_on), (val_off, grads_off) = loss(KERNELS), loss(XLA)
    # In bf16 the kernels' dense layers round their outputs to bf16 (XLA's return float32): ~1e-3.
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
def test_linear_kernels_match_float64_reference(dtype, gelu):
    # M, K, N not multiples of 16, a bias that matters, weights given in float32 (cast inside).
    x, w, b = _rand((37, 24), dtype, 13), _rand((24, 50), jnp.float32, 14) * 0.3, _rand((50,), jnp.float32, 15)
    g = _rand((37, 50), jnp.float32, 16)
    f = backend.dense_gelu if gelu else backend.dense
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
def test_dense_backward_by_blocks_of_rows_matches_float64(dtype):
    # Tall enough that every OpenMP thread (at most one per CPU) gets blocks of rows (512 at most):
    # the kernel then sums per-thread partial weight and bias gradients. An odd M gives threads
    # and blocks of unequal sizes.
    M = 512 * (os.cpu_count() or 1) + 37
    x, w, dz = _rand((M, 24), dtype, 40), _rand((24, 48), dtype, 41), _rand((M, 48), dtype, 42)
    dx, dw, db = calls.dense_backward(x, w, dz)
    x64, w64, dz64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, w, dz))
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5  # bf16: dx rounded once; dW, db float32
    for got, ref in ((dx, dz64 @ w64.T), (dw, x64.T @ dz64), (db, dz64.sum(0))):
        err = np.abs(np.asarray(got.astype(jnp.float32), np.float64) - ref).max() / np.abs(ref).max()
        assert err < tol, err
    assert dw.dtype == db.dtype == jnp.float32 and dx.dtype == dtype


def test_linear_kernels_reject_bad_operands():
    x, w, b = jnp.zeros((4, 3)), jnp.zeros((3, 5)), jnp.zeros((5,))
    with pytest.raises(ValueError, match=r"x \(M, K\), w \(K, N\), b \(N,\)"):
        calls.linear(x, w, jnp.zeros((4,)))
    with pytest.raises(ValueError, match="x \\(M, K\\)"):
        calls.linear_gelu(x, jnp.zeros((4, 5)), b)
    with pytest.raises(TypeError, match="one dtype"):
        calls.linear(x, w.astype(jnp.bfloat16), b)
    with pytest.raises(ValueError, match="one shape and dtype"):
        calls.gelu_backward(jnp.zeros((4, 5)), jnp.zeros((4, 5), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"dz \(M, N\)"):
        calls.dense_backward(x, w, jnp.zeros((4, 4)))
    with pytest.raises(TypeError, match="one dtype"):
        calls.dense_backward(x, w, jnp.zeros((4, 5), jnp.bfloat16))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_adaln_kernels_match_float64_and_the_xla_path(dtype):
    # D not a multiple of the vector width, an odd batch over two threads, rows off zero mean.
    B, L, D, eps = 3, 5, 37, 1e-6
    x = _rand((B, L, D), jnp.float32, 20) * 2.0 + 3.0
    shift, scale = _rand((B, D), jnp.float32, 21), _rand((B, D), jnp.float32, 22) * 0.5
    dh = _rand((B, L, D), dtype, 23)
    f = lambda *a: KERNELS.ln_modulate(*a, dtype, eps)  # noqa: E731
    h, vjp = jax.vjp(f, x, shift, scale)
    assert h.dtype == dtype
    assert calls.ADALN_FWD in _calls(f, x, shift, scale)
    grads = vjp(dh)

    x64, sh64, sc64 = (np.asarray(a, np.float64) for a in (x, shift, scale))
    xhat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + eps)
    h64 = xhat * (1 + sc64[:, None]) + sh64[:, None]
    tol = 8e-3 if dtype == jnp.bfloat16 else 1e-5  # bf16: h rounded once (2^-8 relative)
    assert np.abs(np.asarray(h, np.float64) - h64).max() / np.abs(h64).max() < tol

    # Gradients against XLA's autodiff of the reference formula (same dh, float32).
    _, vjp_xla = jax.vjp(lambda *a: reference.ln_modulate(*a, dtype, eps), x, shift, scale)
    for name, got, want in zip(("dx", "dshift", "dscale"), grads, vjp_xla(dh)):
        assert got.dtype == jnp.float32
        err = np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
        assert err < 1e-5, (name, err)


def test_adaln_kernels_reject_bad_operands():
    x, s = jnp.zeros((2, 3, 4)), jnp.zeros((2, 4))
    with pytest.raises(ValueError, match=r"x \(B, L, D\) and scale \(B, D\)"):
        calls.adaln_forward(x, s, jnp.zeros((3, 4)), jnp.float32, 1e-6)
    with pytest.raises(TypeError, match="float32 x"):
        calls.adaln_forward(x.astype(jnp.bfloat16), s, s, jnp.float32, 1e-6)
    with pytest.raises(ValueError, match="dh must be like x"):
        calls.adaln_backward(x, s, jnp.zeros((2, 3, 5)), 1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_residual_backward_matches_float64(dtype):
    # D not a multiple of the vector width, an odd batch over two threads.
    B, L, D = 3, 5, 37
    x, dy = _rand((B, L, D), jnp.float32, 24), _rand((B, L, D), jnp.float32, 25)
    gate, a = _rand((B, D), jnp.float32, 26), _rand((B, L, D), dtype, 27)
    y, vjp = jax.vjp(KERNELS.gated_residual, x, gate, a)
    assert calls.GATED_RESIDUAL_BWD in _calls(lambda *p: jax.vjp(KERNELS.gated_residual, *p)[1](dy), x, gate, a)
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
        calls.gated_residual_backward(gate[:, :4], a, dy)
    with pytest.raises(TypeError, match="float32 gate and dy"):
        calls.gated_residual_backward(gate, a, dy.astype(jnp.bfloat16))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_kernels_match_float64_and_the_xla_path(dtype):
    # MMDiT's QK-norm on (B, L, H, D) heads; D not a multiple of the vector width, odd row count.
    eps = 1e-6
    x = _rand((3, 5, 2, 37), dtype, 40) * 2.0
    dy = _rand((3, 5, 2, 37), dtype, 41)
    scale = 1.0 + 0.3 * _rand((37,), jnp.float32, 42)

    def run(o):
        f = lambda s, x: o.rms_norm(x, s, eps)  # noqa: E731
        assert (calls.RMS_NORM_FWD in _calls(f, scale, x)) == (o is KERNELS)
        y, vjp = jax.vjp(f, scale, x)
        return y, vjp(dy)

    y, (dscale, dx) = run(KERNELS)
    assert y.dtype == dtype and dx.dtype == dtype
    x64, s64 = np.asarray(x.astype(jnp.float32), np.float64), np.asarray(scale, np.float64)
    y64 = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps) * s64
    tol = 8e-3 if dtype == jnp.bfloat16 else 1e-6  # bf16: y rounded once
    assert np.abs(np.asarray(y, np.float64) - y64).max() / np.abs(y64).max() < tol
    # Gradients against XLA's autodiff of the reference formula (same dy).
    _, (dscale_x, dx_x) = run(XLA)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5  # bf16: dx rounded; dscale summed in another order
    for got, want in ((dx, dx_x), (dscale, dscale_x)):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.abs(got - want).max() / np.abs(want).max() < tol
    with pytest.raises(ValueError, match=r"x \(rows, D\)"):
        calls.rms_norm_forward(x.reshape(-1, 37), jnp.ones((36,)), 1e-6)
    with pytest.raises(ValueError, match="dy must be like x"):
        calls.rms_norm_backward(x.reshape(-1, 37), jnp.ones((37,)), dy.reshape(-1, 37)[:4], 1e-6)


# (B, L, S, H, D): query and key lengths differ (MMDiT-like), a head size that is not 64, one head,
# and short sequences over many heads (the kernel then batches 8 heads per unit).
ATTENTION_SHAPES = [(2, 24, 40, 3, 16), (3, 17, 17, 1, 64), (16, 9, 9, 4, 8)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_attention_matches_float64_reference(shape, dtype):
    B, L, S, H, D = shape
    q, k, v = _rand((B, L, H, D), dtype, 1), _rand((B, S, H, D), dtype, 2), _rand((B, S, H, D), dtype, 3)
    do = _rand((B, L, H, D), dtype, 4)
    o = jax.jit(calls.attention_forward)(q, k, v)
    grads = jax.jit(calls.attention_backward)(q, k, v, do)
    assert o.dtype == dtype and o.shape == q.shape
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape] and all(g.dtype == dtype for g in grads)

    # Gradients of sum(o * do) through float64 autodiff of the reference.
    with jax.enable_x64():
        args = [jnp.asarray(np.asarray(a, np.float64)) for a in (q, k, v)]
        o_ref, vjp = jax.vjp(lambda *a: reference.attention(*a).reshape(B, L, H, D), *args)
        grads_ref = vjp(jnp.asarray(np.asarray(do, np.float64)))
    # float32: 1e-7-level errors measured; bfloat16: the inputs are exact, the result, the
    # probabilities and ds are rounded to bf16 (~2-4e-3 of the largest value measured).
    tol = 2e-2 if dtype == jnp.bfloat16 else 2e-5
    for got, want in zip((o, *grads), (o_ref, *grads_ref)):
        want = np.asarray(want)
        err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
        assert err < tol


def test_fused_attention_is_what_auto_attention_runs_and_matches_the_xla_path():
    q, k, v = (_rand((2, 16, 3, 8), jnp.float32, s) for s in (5, 6, 7))

    def loss(o):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(o.attention(q, k, v))), argnums=(0, 1, 2))

    assert {calls.ATTENTION_FWD, calls.ATTENTION_BWD} <= _calls(loss(KERNELS), q, k, v)
    # attention="xla": softmax between separate (oneDNN) matmuls, not the fused kernels.
    unfused = OnednnOps(attention_impl="xla")
    assert calls.ATTENTION_FWD not in _calls(loss(unfused), q, k, v) and calls.MATMUL in _calls(loss(unfused), q, k, v)
    val_f, grads_f = jax.jit(loss(KERNELS))(q, k, v)
    for other in (XLA, unfused):
        val_x, grads_x = jax.jit(loss(other))(q, k, v)
        np.testing.assert_allclose(val_f, val_x, rtol=1e-5)
        for g_f, g_x in zip(grads_f, grads_x):
            np.testing.assert_allclose(g_f, g_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_packed_self_attention_is_the_fused_attention_of_its_slots(dtype):
    # Short sequences over many heads (8 heads per unit) and one head per unit.
    for B, L, H, D in ((16, 9, 4, 8), (2, 40, 3, 16)):
        qkv, do = _rand((B, L, 3, H, D), dtype, 11), _rand((B, L, H, D), dtype, 12)
        q, k, v = (qkv[:, :, i] for i in range(3))
        o = jax.jit(calls.attention_packed_forward)(qkv)
        dqkv = jax.jit(calls.attention_packed_backward)(qkv, do)
        assert o.dtype == dtype and dqkv.dtype == dtype and dqkv.shape == qkv.shape
        # The same units and primitives, only the rows are gathered from (and scattered to) the
        # packed array: bit-identical to the unpacked kernels.
        np.testing.assert_array_equal(
            np.asarray(o, np.float32), np.asarray(calls.attention_forward(q, k, v), np.float32)
        )
        want = jnp.stack(calls.attention_backward(q, k, v, do), axis=2)
        np.testing.assert_array_equal(np.asarray(dqkv, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_joint_attention_is_the_fused_attention_of_the_concatenated_streams(dtype):
    # An image stream and a context stream (one context token, and several), grouped heads.
    for B, L, T, H, D in ((3, 16, 5, 3, 8), (2, 9, 1, 2, 16)):
        x = tuple(_rand((B, L, H, D), dtype, 50 + i) for i in range(3))
        c = tuple(_rand((B, T, H, D), dtype, 60 + i) for i in range(3))
        do_x, do_c = _rand((B, L, H, D), dtype, 70), _rand((B, T, H, D), dtype, 71)
        o_x, o_c = jax.jit(calls.attention_joint_forward)(x, c)
        (dx, dc) = jax.jit(calls.attention_joint_backward)(x, c, do_x, do_c)
        cat = [jnp.concatenate([a, b], axis=1) for a, b in zip(x, c)]
        # The same units and primitives over the same rows, gathered from two arrays: bit-identical.
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        np.testing.assert_array_equal(f32(jnp.concatenate([o_x, o_c], 1)), f32(calls.attention_forward(*cat)))
        want = calls.attention_backward(*cat, jnp.concatenate([do_x, do_c], 1))
        for got_x, got_c, w in zip(dx, dc, want):
            assert got_x.dtype == dtype and got_c.shape == (B, T, H, D)
            np.testing.assert_array_equal(f32(jnp.concatenate([got_x, got_c], 1)), f32(w))
    with pytest.raises(ValueError, match="differ in batch, heads or head size"):
        calls.attention_joint_forward(x, tuple(a[:1] for a in c))
    with pytest.raises(ValueError, match="do of each stream"):
        calls.attention_joint_backward(x, c, do_x, do_x)


def test_dit_self_attention_reads_the_packed_projection_and_matches_the_xla_path():
    from flax import nnx

    from jax_mmdit.models.attention import QKV

    h = _rand((2 * 16, 48), jnp.float32, 13)

    def loss(o):
        graphdef, params = nnx.split(QKV(48, 3, False, jnp.float32, o, nnx.Rngs(0)))
        f = jax.value_and_grad(
            lambda p, h: jnp.sum(jnp.sin(nnx.merge(graphdef, p).self_attention(h, 2))), argnums=(0, 1)
        )
        return f, params

    packed, params = loss(KERNELS)
    compiled = jax.jit(packed).lower(params, h).compile()
    assert {calls.ATTENTION_PACKED_FWD, calls.ATTENTION_PACKED_BWD} <= KERNELS.kernel_calls(compiled)
    assert "concatenate" not in compiled.as_text()  # the gradient comes out packed
    (val_p, grads_p), (val_x, grads_x) = compiled(params, h), jax.jit(loss(XLA)[0])(params, h)
    np.testing.assert_allclose(val_p, val_x, rtol=1e-5)
    for g_p, g_x in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)):
        np.testing.assert_allclose(g_p, g_x, rtol=1e-4, atol=1e-5)


def test_fused_attention_rejects_bad_operands():
    q = jnp.zeros((2, 8, 3, 16), jnp.float32)
    with pytest.raises(TypeError, match="one dtype"):
        calls.attention_forward(q, q.astype(jnp.bfloat16), q)
    with pytest.raises(ValueError, match=r"\(B, L, H, D\)"):
        calls.attention_forward(q, jnp.zeros((2, 8, 3, 8), jnp.float32), jnp.zeros((2, 8, 3, 8), jnp.float32))
    with pytest.raises(ValueError, match="do must be like q"):
        calls.attention_backward(q, q, q, q[:, :4])
    with pytest.raises(ValueError, match=r"\(B, L, 3, H, D\)"):
        calls.attention_packed_forward(jnp.zeros((2, 8, 2, 3, 16), jnp.float32))
    with pytest.raises(ValueError, match="do must be"):
        calls.attention_packed_backward(jnp.zeros((2, 8, 3, 3, 16), jnp.float32), q[:, :4])


def test_attention_kernels_are_counted_as_model_flops():
    B, L, S, H, D = 2, 24, 40, 3, 16
    q, kv = _rand((B, L, H, D), jnp.float32, 1), _rand((B, S, H, D), jnp.float32, 2)
    # sum(o * c) with a constant c: no other FLOP-heavy op. value_and_grad: the gradient alone
    # does not need the forward's output, and XLA drops the forward call.
    c = _rand((B, L, H * D), jnp.float32, 3)
    f = jax.value_and_grad(lambda q, kv: jnp.sum(KERNELS.attention(q, kv, kv) * c), argnums=(0, 1))
    compiled = jax.jit(f).lower(q, kv).compile()
    attention_flops = backend.hlo_flops(compiled.as_text())
    assert attention_flops == (4 + 8) * B * H * L * S * D  # forward 2 matmuls, backward 4
    assert KERNELS.flops(compiled) >= attention_flops
    # Self-attention on the packed projection: S = L.
    qkv = _rand((B, L, 3, H, D), jnp.float32, 4)
    f = jax.value_and_grad(lambda qkv: jnp.sum(KERNELS.attention_packed(qkv) * c))
    compiled = jax.jit(f).lower(qkv).compile()
    assert {calls.ATTENTION_PACKED_FWD, calls.ATTENTION_PACKED_BWD} <= KERNELS.kernel_calls(compiled)
    assert backend.hlo_flops(compiled.as_text()) == (4 + 8) * B * H * L * L * D
    # Joint attention over two streams of L and S tokens: one sequence of L + S.
    x, cs = (qkv[:, :, 0],) * 3, (kv,) * 3
    f = jax.value_and_grad(lambda x, c: sum(jnp.sum(o) for o in KERNELS.joint_attention(x, c)), argnums=(0, 1))
    compiled = jax.jit(f).lower(x, cs).compile()
    assert {calls.ATTENTION_JOINT_FWD, calls.ATTENTION_JOINT_BWD} <= KERNELS.kernel_calls(compiled)
    assert backend.hlo_flops(compiled.as_text()) == (4 + 8) * B * H * (L + S) ** 2 * D


def test_kernels_are_counted_in_flops_like_xla_counts_its_own_ops():
    x, w, b = _rand((64, 48), jnp.bfloat16, 7), _rand((48, 40), jnp.float32, 8), _rand((40,), jnp.float32, 12)
    q = _rand((2, 3, 16, 8), jnp.bfloat16, 9)

    def f(o):
        def loss(x, w, b, q):
            # sin: XLA would otherwise simplify the gradient of a plain sum of a dot away; 2w: it
            # would compute x @ w once for both layers.
            y = jnp.sum(jnp.sin(o.dense(x, w, b, jnp.bfloat16) + o.dense_gelu(x, 2 * w, b, jnp.bfloat16)))
            return y + jnp.sum(jnp.sin(o.attention(q, q, q)))

        return jax.value_and_grad(loss, argnums=(0, 1, 2, 3))

    counts = {}
    for o in (KERNELS, XLA):
        compiled = jax.jit(f(o)).lower(x, w, b, q).compile()
        counts[o.name] = o.flops(compiled)
        on = o.kernel_calls(compiled)
        assert {calls.DENSE_BWD, calls.LINEAR, calls.LINEAR_GELU} <= on if o is KERNELS else on == frozenset()
    kernel_flops = backend.hlo_flops(jax.jit(f(KERNELS)).lower(x, w, b, q).compile().as_text())
    # 6 dense matmuls (64x48x40) + 6 attention matmuls (2x16 heads of 3x3x8), x2 FLOPs: exactly the
    # kernels' count (the bias gradients' column sums are not matmuls). XLA also counts softmax's
    # and the GELU's elementwise work, which the kernels' counts leave out (7% of these tiny
    # matmuls' FLOPs), and in the kernels' program the rest.
    matmul_flops = 2 * (6 * 64 * 48 * 40 + 6 * 2 * 16 * 3 * 3 * 8)
    assert kernel_flops == matmul_flops
    assert counts["xla"] > matmul_flops and counts["onednn"] > matmul_flops
    assert counts["onednn"] == pytest.approx(counts["xla"], rel=0.1)


def test_unbuildable_kernels_fall_back_with_a_warning_or_fail_when_asked_for(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    previous = ops.set_auto(None)
    build.load.cache_clear()
    try:
        one = jax.devices()[:1]
        with pytest.warns(UserWarning, match="kernels are unavailable.*no C\\+\\+ compiler"):
            assert type(ops.resolve("auto", devices=one)) is XlaCpuOps
        with pytest.raises(UserError, match="kernels='onednn' but the C\\+\\+ kernels are unavailable"):
            ops.resolve("onednn", devices=one)
    finally:
        ops.set_auto(previous)
        build.load.cache_clear()  # the real kernels load again for later tests


def test_build_is_cached_per_source_and_jaxlib(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = build.build()
    assert path.parent == tmp_path and path.stat().st_size > 0
    mtime = path.stat().st_mtime_ns
    assert build.build() == path and path.stat().st_mtime_ns == mtime  # not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary files left


@pytest.mark.parametrize("arch", ["dit", "mmdit"])
def test_model_gradients_with_the_kernels_match_xla(arch):
    # Every kernel a model uses, through the models' own code paths: DiT takes the packed
    # self-attention; MMDiT (text-conditioned: a context stream with its own gated residuals, and
    # QK-norm) the joint attention over both streams; both the gated-residual, adaLN and dense
    # kernels. fp32, randomised weights (adaLN-Zero's zero gates would hide the branches).
    from flax import nnx

    from jax_mmdit.models import ModelConfig, create_model

    extra = dict(num_classes=0, context_dim=8, pooled_dim=6, qk_norm=True) if arch == "mmdit" else dict(num_classes=5)
    cfg = ModelConfig(
        arch=arch, image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2, **extra
    )
    rng = np.random.default_rng(0)
    x, t = _rand((2, 8, 8, 3), jnp.float32, 30), jnp.asarray([0.3, 0.8])
    cond = (
        dict(context_BxTxE=_rand((2, 5, 8), jnp.float32, 31), pooled_BxP=_rand((2, 6), jnp.float32, 32))
        if arch == "mmdit"
        else dict(y_B=jnp.asarray([1, 4]))
    )
    params = None
    results = {}
    for o in (XLA, KERNELS):
        graphdef, state = nnx.split(create_model(cfg, nnx.Rngs(0), o))
        if params is None:
            params = jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), p.dtype), state)
        f = jax.value_and_grad(lambda p, g=graphdef: jnp.mean(jnp.sin(nnx.merge(g, p)(x, t, **cond))))
        compiled = jax.jit(f).lower(params).compile()
        used = o.kernel_calls(compiled)
        assert (calls.GATED_RESIDUAL_BWD in used) == (o is KERNELS)
        assert (calls.ATTENTION_PACKED_BWD in used) == (o is KERNELS and arch == "dit")
        assert (calls.RMS_NORM_BWD in used) == (o is KERNELS and arch == "mmdit")  # QK-norm
        assert (calls.ATTENTION_JOINT_BWD in used) == (o is KERNELS and arch == "mmdit")
        results[o.name] = compiled(params)
    np.testing.assert_allclose(float(results["onednn"][0]), float(results["xla"][0]), rtol=1e-5)
    for g_on, g_off in zip(jax.tree.leaves(results["onednn"][1]), jax.tree.leaves(results["xla"][1])):
        np.testing.assert_allclose(g_on, g_off, rtol=1e-4, atol=1e-5 * float(np.abs(g_off).max() + 1e-6))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_steps_on_the_kernels_match_xla(tmp_path, precision):
    import dataclasses

    from jax_mmdit.config import MeshConfig, get_config
    from jax_mmdit.train.trainer import Trainer

    losses = {}
    for kernels in ("xla", "onednn"):
        cfg = dataclasses.replace(
            get_config("tiny"),
            run_dir=str(tmp_path / kernels),
            mesh=MeshConfig(data=1, fsdp=1),
            precision=precision,
            kernels=kernels,
        )
        tr = Trainer(cfg, devices=jax.devices()[:1])
        it = tr.train_data.iterator(cfg.batch_size, seed=cfg.seed)
        losses[kernels] = np.asarray(jax.device_get([tr.train_step(next(it))["loss"] for _ in range(3)]))
        # What the benchmark reports per row: which of the kernels the compiled step calls.
        expected = {calls.DENSE_BWD, calls.ATTENTION_PACKED_BWD, calls.ADALN_BWD, calls.GATED_RESIDUAL_BWD}
        used = tr.ops.kernel_calls(tr.compiled_step)
        assert expected <= used if kernels == "onednn" else used == frozenset()
    assert len(set(np.round(losses["xla"], 6))) == 3  # the loss moves, so parameters were updated
    np.testing.assert_allclose(losses["onednn"], losses["xla"], rtol=1e-3 if precision == "bf16" else 1e-5)


def test_concurrent_calls_of_one_primitive_do_not_share_a_scratchpad():
    # XLA:CPU runs independent thunks concurrently: here 12 same-shape matmuls (like every block's
    # adaLN modulation), i.e. one cached oneDNN primitive executed from two threads at once. With
    # oneDNN's library-managed scratchpad they shared one buffer and, now and then, corrupted each
    # other's results (the default config's fp32 training diverged).
    xs = _rand((12, 128, 192), jnp.float32, 20)
    ws = _rand((12, 192, 1152), jnp.float32, 21)
    f = jax.jit(lambda xs, ws: [calls.matmul(xs[i], ws[i]) for i in range(12)])
    want = np.einsum("imk,ikn->imn", np.asarray(xs, np.float64), np.asarray(ws, np.float64))
    for _ in range(20):
        got = np.stack([np.asarray(r) for r in f(xs, ws)])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
