"""Model tests: tiny shapes (each XLA compile costs ~1 s on 2 cores); big presets only abstractly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_mmdit.models import PRESETS, ModelConfig, count_params, create_model, model_summary
from jax_mmdit.models.layers import FixedEmbedding, sincos_pos_embed_2d


def tiny(arch: str = "dit", **overrides) -> ModelConfig:
    base = dict(arch=arch, image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2)
    base["num_classes"] = 5
    return ModelConfig(**{**base, **overrides})


def randomise(model: nnx.Module, seed: int = 0, std: float = 0.2) -> None:
    """Overwrite every Param (zero-initialised ones included) so outputs are non-trivial."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)  # numpy: no per-shape XLA compiles
    new = [jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def inputs(cfg: ModelConfig, batch: int = 2, seed: int = 0):
    kx, kt = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, cfg.image_size, cfg.image_size, cfg.in_channels))
    t = jax.random.uniform(kt, (batch,))
    y = jnp.arange(batch, dtype=jnp.int32) % (cfg.num_classes + 1)  # includes the null class when batch > C
    return x, t, y


@nnx.jit
def forward(model, x, t, y):
    return model(x, t, y)


# ---- construction / output ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        tiny("dit"),
        tiny("dit", learn_sigma=True, stem="conv", pos_embed="learned", mlp="swiglu", qk_norm=True, patch_size=4),
        tiny("mmdit"),
        tiny("mmdit", learn_sigma=True, num_classes=0, num_context_tokens=3, image_size=12, patch_size=1),
    ],
    ids=["dit", "dit-variants", "mmdit", "mmdit-uncond"],
)
def test_fresh_model_outputs_exact_zeros_with_right_shape(cfg):
    model = create_model(cfg, rngs=nnx.Rngs(0))
    x, t, y = inputs(cfg, batch=3)
    out = forward(model, x, t, None if cfg.num_classes == 0 else y)
    assert out.shape == (3, cfg.image_size, cfg.image_size, cfg.out_channels)
    assert out.dtype == jnp.float32
    assert cfg.out_channels == (2 if cfg.learn_sigma else 1) * cfg.in_channels
    assert np.all(np.asarray(out) == 0.0)
    # ...and the zeros come from adaLN-Zero, not from a dead network: random weights give signal.
    randomise(model)
    assert float(jnp.abs(forward(model, x, t, None if cfg.num_classes == 0 else y)).max()) > 1e-2


@pytest.mark.parametrize(
    "name, expected",
    [
        ("DiT-XL/2", 675_129_632),
        ("DiT-L/2", 458_102_816),
        ("DiT-B/2", 130_512_416),
        ("DiT-S/2", 32_963_360),
        ("DiT-XL/4", 675_074_432),
        ("DiT-S/8", 33_148_160),
    ],
)
def test_preset_param_counts_match_facebookresearch_dit(name, expected):
    cfg = ModelConfig.from_preset(name, image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    model = nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0)))
    counts = count_params(model)
    assert counts["total"] == expected
    assert counts["fixed"] == cfg.num_patches * cfg.hidden_size  # the sin-cos table, counted like DiT


def test_mmdit_param_count_matches_sd3_layout():
    """Hand count: per block two streams of (adaLN 6D, QKV, out, MLP); last context stream is
    pre-only (adaLN 2D + QKV); QK-norm scales per head dim; learned class tokens + label pool."""
    cfg = ModelConfig.from_preset("MMDiT-S/2", image_size=32, in_channels=4, num_classes=10, num_context_tokens=4)
    D, K, p, C = cfg.hidden_size, cfg.head_dim, cfg.patch_size, cfg.in_channels
    lin = lambda i, o: i * o + o  # noqa: E731
    stream = lin(D, 6 * D) + lin(D, 3 * D) + 2 * K + lin(D, D) + lin(D, 4 * D) + lin(4 * D, D)
    pre_only = lin(D, 2 * D) + lin(D, 3 * D) + 2 * K
    expected = (
        lin(p * p * C, D) + cfg.num_patches * D  # patchify + sin-cos table
        + lin(256, D) + lin(D, D)  # timestep MLP
        + 11 * 4 * D + 11 * D  # class tokens + pooled label embedding (10 classes + null)
        + (cfg.depth - 1) * 2 * stream + stream + pre_only
        + lin(D, 2 * D) + lin(D, p * p * C)  # final layer
    )  # fmt: skip
    assert PRESETS["MMDiT-S/2"]["hidden_size"] == PRESETS["DiT-S/2"]["hidden_size"] == 384
    assert count_params(nnx.eval_shape(lambda: create_model(cfg, rngs=nnx.Rngs(0))))["total"] == expected


def test_null_class_is_num_classes_with_extra_table_row():
    for arch, num_classes in (("dit", 7), ("mmdit", 3)):
        cfg = tiny(arch, num_classes=num_classes)
        model = create_model(cfg, rngs=nnx.Rngs(0))
        assert model.null_class == cfg.null_class == num_classes
        table = model.y_embedder.table if arch == "dit" else model.pooled_embedder.table
        assert table.embedding.shape == (num_classes + 1, cfg.hidden_size)
    mm = create_model(tiny("mmdit", num_classes=3, num_context_tokens=2), rngs=nnx.Rngs(0))
    assert mm.class_tokens.table.embedding.shape == (4, 2 * 32)


# ---- config validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: tiny(image_size=10, patch_size=4), "image_size 10 must be divisible by patch_size 4"),
        (lambda: tiny(hidden_size=36, num_heads=5), "hidden_size 36 must be divisible by num_heads 5"),
        (lambda: ModelConfig.from_preset("DiT-M/2"), "Unknown model preset 'DiT-M/2'"),
        (lambda: ModelConfig.from_preset("DiT-S/2", hidden=3), "Unknown ModelConfig field"),
        (lambda: tiny(arch="vit"), r"arch must be one of \('dit', 'mmdit'\)"),
        (lambda: tiny(dtype="float64"), "dtype must be one of"),
        (lambda: tiny("mmdit", context_dim=16), "not both"),
        (lambda: tiny("dit", context_dim=16), "MMDiT options"),
    ],
)
def test_invalid_config_raises_readable_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_presets_cover_all_sizes_and_patches():
    for prefix in ("DiT", "MMDiT"):
        for size in ("S", "B", "L", "XL"):
            for patch in (2, 4, 8):
                cfg = ModelConfig.from_preset(f"{prefix}-{size}/{patch}", image_size=32)
                assert cfg.patch_size == patch and cfg.arch == prefix.lower()
    xl = ModelConfig.from_preset("DiT-XL/2")
    assert (xl.hidden_size, xl.depth, xl.num_heads) == (1152, 28, 16)


def test_bad_inputs_raise_value_error():
    cfg = tiny("dit")
    model = create_model(cfg, rngs=nnx.Rngs(0))
    x, t, y = inputs(cfg)
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.transpose(x, (0, 3, 1, 2)), t, y)
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        model(x, t[:1], y)
    mm = create_model(tiny("mmdit", num_classes=0, context_dim=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="context"):
        mm(x, t)


# ---- numerics ------------------------------------------------------------------------------------
def test_sincos_table_matches_dit_reference_layout():
    table = sincos_pos_embed_2d(8, grid=3)  # token (i, j) at row i*3+j: [w-part(j), h-part(i)]
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    i, j = 2, 1
    expect = np.concatenate([np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)])
    np.testing.assert_allclose(table[i * 3 + j], expect, rtol=1e-6)


@pytest.mark.parametrize("arch", ["dit", "mmdit"])
def test_bf16_compute_keeps_fp32_params_and_is_close_to_fp32(arch):
    cfg = tiny(arch)
    model32 = create_model(cfg, rngs=nnx.Rngs(0))
    randomise(model32, std=0.1)
    model16 = create_model(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(1))
    nnx.update(model16, nnx.state(model32))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16)))
    x, t, y = inputs(cfg)
    out32, out16 = forward(model32, x, t, y), forward(model16, x, t, y)
    assert out16.dtype == jnp.float32
    scale = float(jnp.abs(out32).max())
    err = float(jnp.abs(out16 - out32).max())
    assert scale > 0.05 and 0 < err < 0.05 * scale  # bf16 really ran (err > 0) and stayed close


def test_model_is_pure_and_state_holds_only_arrays():
    cfg = tiny("mmdit")
    model = create_model(cfg, rngs=nnx.Rngs(0))
    randomise(model)
    graphdef_before, state_before = nnx.split(model)
    x, t, y = inputs(cfg)
    first, second = forward(model, x, t, y), forward(model, x, t, y)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    graphdef_after, state_after = nnx.split(model)
    assert graphdef_before == graphdef_after
    leaves_before, leaves_after = jax.tree.leaves(state_before), jax.tree.leaves(state_after)
    assert all(isinstance(v, jax.Array) for v in leaves_after)
    assert all(np.array_equal(a, b) for a, b in zip(leaves_before, leaves_after))
    # Same weights, functional API: merge(graphdef, state) reproduces the output.
    merged = nnx.merge(graphdef_after, state_after)
    np.testing.assert_array_equal(np.asarray(forward(merged, x, t, y)), np.asarray(first))


def test_conditioning_changes_output_and_fixed_table_gets_no_gradient():
    cfg = tiny("mmdit")
    model = create_model(cfg, rngs=nnx.Rngs(0))
    randomise(model)
    x, t, _ = inputs(cfg)
    out_a = forward(model, x, t, jnp.array([0, 1], jnp.int32))
    out_null = forward(model, x, t, jnp.full((2,), cfg.null_class, jnp.int32))
    assert float(jnp.abs(out_a - out_null).max()) > 1e-3

    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x, t, jnp.array([0, 1], jnp.int32)) ** 2)))(model)
    assert not jax.tree.leaves(nnx.state(grads, FixedEmbedding))  # sin-cos table is not trained
    g = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert g and all(bool(jnp.all(jnp.isfinite(a))) for a in g)


def test_text_conditioned_mmdit_uses_context_and_pooled():
    cfg = tiny("mmdit", num_classes=0, context_dim=8, pooled_dim=6)
    model = create_model(cfg, rngs=nnx.Rngs(0))
    randomise(model)
    x, t, _ = inputs(cfg)
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 8))
    pooled = jax.random.normal(jax.random.key(2), (2, 6))
    run = nnx.jit(lambda m, c, p: m(x, t, context_BxTxE=c, pooled_BxP=p))
    base = run(model, ctx, pooled)
    assert base.shape == x.shape
    assert float(jnp.abs(run(model, ctx.at[:, 0].add(1.0), pooled) - base).max()) > 1e-3
    assert float(jnp.abs(run(model, ctx, pooled + 1.0) - base).max()) > 1e-3


def test_remat_matches_plain_forward_and_gradient():
    cfg = tiny("dit")
    model = create_model(cfg, rngs=nnx.Rngs(0))
    randomise(model)
    remat_model = create_model(dataclasses.replace(cfg, remat=True), rngs=nnx.Rngs(0))
    nnx.update(remat_model, nnx.state(model))
    x, t, y = inputs(cfg)
    loss = lambda m: jnp.mean(m(x, t, y) ** 2)  # noqa: E731
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(model)
    l2, g2 = nnx.jit(nnx.value_and_grad(loss))(remat_model)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(nnx.state(g1)), jax.tree.leaves(nnx.state(g2))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# ---- summary -------------------------------------------------------------------------------------
def test_model_summary_reports_xl2_params_and_paper_flops():
    cfg = ModelConfig.from_preset("DiT-XL/2", image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    info = model_summary(cfg)
    assert info["params"] == 675_129_632
    assert info["trainable_params"] == 675_129_632 - 256 * 1152
    # Paper: 118.6 Gflops counting multiply-adds; XLA counts 2 FLOPs per multiply-add.
    assert info["gmacs_per_image"] == pytest.approx(118.6, rel=0.02)
    assert info["gflops_per_image"] == pytest.approx(2 * info["gmacs_per_image"])
