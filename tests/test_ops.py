"""The operations layer: every backend computes the reference maths (values and gradients), the
key mask, and how `resolve` picks a backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mmdit import ops
from jax_mmdit.errors import UserError
from jax_mmdit.ops import ReferenceOps, XlaCpuOps, XlaOps
from jax_mmdit.ops.onednn import OnednnOps

REF = ReferenceOps()
# fp32: different summation orders only. bf16: the backends round at different points (a dense
# layer's output to bf16 or not, the bias added before or after rounding): a few bf16 ulps.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def backends():
    assert ops.onednn.load() is None, "the C++ kernels must build here (make setup installs g++ and libdnnl-dev)"
    return {
        "xla-cpu": XlaCpuOps(),
        "onednn": OnednnOps(),
        "onednn-xla-attention": OnednnOps(attention_impl="xla"),
        "accelerator-xla": XlaOps(platform="tpu"),
    }


def _rand(shape, seed, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def _close(got, want, dtype, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err <= TOL[dtype], (what, err)


def _check_value_and_grads(backend, fn_of_ops, args, dtype):
    """fn_of_ops(ops)(*args) -> array: value and the gradient of a fixed random projection of it,
    on `backend` against the reference."""

    def loss(o):
        out = jax.eval_shape(fn_of_ops(o), *args)
        r = _rand(out.shape, 99)
        return lambda *a: jnp.sum(fn_of_ops(o)(*a).astype(jnp.float32) * r)

    (v_b, g_b), (v_r, g_r) = (
        jax.jit(jax.value_and_grad(loss(o), argnums=tuple(range(len(args)))))(*args) for o in (backend, REF)
    )
    _close(v_b, v_r, dtype, "value")
    for i, (a, b) in enumerate(zip(g_b, g_r)):
        _close(a, b, dtype, f"grad {i}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["xla-cpu", "onednn", "onednn-xla-attention", "accelerator-xla"])
def test_every_backend_computes_the_reference_maths(backends, name, dtype):
    b = backends[name]
    x, w, bias = _rand((40, 24), 0, dtype), _rand((24, 36), 1, scale=0.3), _rand((36,), 2)
    _check_value_and_grads(b, lambda o: lambda x, w, bias: o.dense(x, w, bias, dtype), (x, w, bias), dtype)
    _check_value_and_grads(b, lambda o: lambda x, w, bias: o.dense_gelu(x, w, bias, dtype), (x, w, bias), dtype)
    X = _rand((3, 5, 37), 3, scale=2.0) + 1.0  # rows off zero mean; D not a vector width
    shift, scale = _rand((3, 37), 4), _rand((3, 37), 5, scale=0.5)
    _check_value_and_grads(b, lambda o: lambda *a: o.ln_modulate(*a, dtype, 1e-6), (X, shift, scale), dtype)
    a = _rand((3, 5, 37), 6, dtype)
    _check_value_and_grads(b, lambda o: o.gated_residual, (X, shift, a), dtype)
    heads = _rand((3, 5, 2, 37), 7, dtype)
    _check_value_and_grads(b, lambda o: lambda x, s: o.rms_norm(x, s, 1e-6), (heads, 1.0 + scale[0]), dtype)
    q, k, v = (_rand((2, 9, 3, 16), s, dtype) for s in (8, 9, 10))
    _check_value_and_grads(b, lambda o: o.attention, (q, k, v), dtype)
    qkv = _rand((2, 9, 3, 3, 16), 11, dtype)
    _check_value_and_grads(b, lambda o: o.attention_packed, (qkv,), dtype)
    c = tuple(_rand((2, 4, 3, 16), s, dtype) for s in (12, 13, 14))
    _check_value_and_grads(b, lambda o: lambda x, c: jnp.concatenate(o.joint_attention(x, c), 1), ((q, k, v), c), dtype)


@pytest.mark.parametrize("name", ["reference", "xla-cpu", "onednn", "accelerator-xla"])
def test_masked_keys_get_no_weight(backends, name):
    b = REF if name == "reference" else backends[name]
    q, k, v = (_rand((2, 6, 2, 8), s) for s in (20, 21, 22))
    mask = jnp.asarray([[True] * 5 + [False] * 3, [True] * 3 + [False] * 5])
    k_pad, v_pad = (jnp.concatenate([a, 100.0 * _rand((2, 2, 2, 8), 23)], axis=1) for a in (k, v))
    got = jax.jit(b.attention)(q, k_pad, v_pad, mask)
    for i, n in enumerate((5, 3)):  # the same as attending to the kept keys only
        want = REF.attention(q[i : i + 1], k_pad[i : i + 1, :n], v_pad[i : i + 1, :n])
        np.testing.assert_allclose(got[i : i + 1], want, rtol=1e-5, atol=1e-5)
    # Masked keys get no gradient either.
    dk = jax.grad(lambda k: jnp.sum(jnp.sin(b.attention(q, k, v_pad, mask))))(k_pad)
    assert float(jnp.abs(dk[0, 5:]).max()) == 0.0 and float(jnp.abs(dk[0, :5]).max()) > 0


@pytest.mark.parametrize("name", ["reference", "onednn"])
def test_padding_the_context_with_masked_tokens_leaves_the_image_stream_unchanged(backends, name):
    b = REF if name == "reference" else backends[name]
    x = tuple(_rand((2, 9, 2, 8), s) for s in (30, 31, 32))
    c = tuple(_rand((2, 3, 2, 8), s) for s in (33, 34, 35))
    padded = tuple(jnp.concatenate([a, _rand((2, 4, 2, 8), 36 + i)], axis=1) for i, a in enumerate(c))
    mask = jnp.asarray([[True] * 3 + [False] * 4] * 2)
    o_x, o_c = b.joint_attention(x, c)
    p_x, p_c = b.joint_attention(x, padded, mask)
    np.testing.assert_allclose(p_x, o_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_c[:, :3], o_c, rtol=1e-5, atol=1e-5)


@pytest.fixture
def auto_rule():
    """`kernels="auto"` by its rule, whatever the suite's --kernels."""
    previous = ops.set_auto(None)
    yield
    ops.set_auto(previous)


def test_resolve_picks_the_backend_once_for_the_devices(auto_rule):
    one, eight = jax.devices()[:1], jax.devices()[:8]
    assert isinstance(ops.resolve("auto", devices=one), OnednnOps)
    # No sharding rule for a custom call: on a mesh XLA would gather and replicate it.
    assert type(ops.resolve("auto", devices=eight)) is XlaCpuOps
    assert isinstance(ops.resolve("onednn", devices=eight), OnednnOps)  # asked for: replicated, but allowed
    assert type(ops.resolve("xla", devices=one)) is XlaCpuOps
    assert ops.resolve("auto", "xla", one).attention_impl == "xla"
    with pytest.raises(UserError, match="kernels must be one of"):
        ops.resolve("sometimes")
    with pytest.raises(UserError, match="needs a GPU"):
        ops.resolve("auto", "cudnn", one)
    # Hashable and equal by value: jit caches key on the graph definition that holds them.
    assert hash(OnednnOps()) == hash(OnednnOps()) and OnednnOps() != XlaCpuOps()


def test_set_auto_changes_what_auto_means_in_this_process(auto_rule):
    assert ops.set_auto("xla") is None
    assert type(ops.resolve("auto", devices=jax.devices()[:1])) is XlaCpuOps
    assert ops.set_auto("onednn") == "xla"
    assert isinstance(ops.resolve("auto", devices=jax.devices()[:8]), OnednnOps)
    with pytest.raises(ValueError):
        ops.set_auto("on")
