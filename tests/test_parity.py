"""Numerical parity with the diffusers PyTorch implementations (CPU, fp32, random weights).

Every weight is randomised, including the ones adaLN-Zero initialises to zero, so a wrong
mapping, transpose or chunk order changes the output and fails the test.
"""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from jax_mmdit.models import ModelConfig, dit_from_diffusers, mmdit_from_diffusers  # noqa: E402

TOL = 1e-4
B, SIZE, C, PATCH, HEADS, HEAD_DIM, DEPTH = 3, 16, 4, 2, 2, 32, 2


def _randomise(module, seed: int, std: float = 0.1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    x_BxHxWxC = rng.standard_normal((B, SIZE, SIZE, C)).astype(np.float32)
    t_B = np.array([0.0, 0.37, 1.0], np.float32)
    x_torch = torch.from_numpy(x_BxHxWxC.transpose(0, 3, 1, 2).copy())
    # Same float32 product as the model's internal t * 1000.
    t_torch = torch.from_numpy((t_B * np.float32(1000.0)).astype(np.float32))
    return x_BxHxWxC, t_B, x_torch, t_torch


def _nchw_to_nhwc(out) -> np.ndarray:
    return out.detach().numpy().transpose(0, 2, 3, 1)


def test_dit_matches_diffusers():
    num_classes = 10
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=2 * C,
        num_layers=DEPTH, sample_size=SIZE, patch_size=PATCH, num_embeds_ada_norm=num_classes,
        norm_eps=1e-6,  # DiT's LayerNorm eps (diffusers defaults to 1e-5 before the MLP)
    ).eval()  # fmt: skip
    _randomise(ref, seed=0)
    blocks = ref.transformer_blocks
    for blk in blocks[1:]:  # ours share one embedder, as in the DiT paper
        blk.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
    for blk in blocks:  # original DiT/SD3 sinusoid (diffusers' DiT port uses shift 1)
        blk.norm1.emb.time_proj.downscale_freq_shift = 0

    cfg = ModelConfig(
        arch="dit", image_size=SIZE, in_channels=C, patch_size=PATCH, hidden_size=HEADS * HEAD_DIM,
        depth=DEPTH, num_heads=HEADS, num_classes=num_classes, learn_sigma=True,
    )  # fmt: skip
    model = dit_from_diffusers(ref, cfg)

    x, t, x_torch, t_torch = _inputs(seed=1)
    y = np.array([3, 0, num_classes], np.int32)  # includes the null class
    with torch.no_grad():
        want = _nchw_to_nhwc(ref(x_torch, timestep=t_torch, class_labels=torch.from_numpy(y).long()).sample)
    got = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    assert got.shape == want.shape == (B, SIZE, SIZE, 2 * C)
    assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero tensors
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_mmdit_matches_sd3(qk_norm):
    ctx_dim, pooled_dim, ctx_len = 24, 16, 5
    ref = diffusers.SD3Transformer2DModel(
        sample_size=SIZE, patch_size=PATCH, in_channels=C, num_layers=DEPTH, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=ctx_dim, caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=pooled_dim, out_channels=C,
        pos_embed_max_size=12,  # > 8x8 grid: exercises SD3's scaled, centre-cropped sin-cos table
        qk_norm="rms_norm" if qk_norm else None,
    ).eval()  # fmt: skip
    _randomise(ref, seed=2)

    cfg = ModelConfig(
        arch="mmdit", image_size=SIZE, in_channels=C, patch_size=PATCH, hidden_size=HEADS * HEAD_DIM,
        depth=DEPTH, num_heads=HEADS, num_classes=0, context_dim=ctx_dim, pooled_dim=pooled_dim,
        qk_norm=qk_norm,
        # SD3's table: the centre 8x8 of a 12x12 grid whose positions are rescaled by 8/12.
        pos_embed_offset=2.0, pos_embed_scale=8 / 12,
    )  # fmt: skip
    model = mmdit_from_diffusers(ref.state_dict(), cfg)
    with pytest.raises(ValueError, match="position table"):  # a config that describes another table
        mmdit_from_diffusers(ref.state_dict(), dataclasses.replace(cfg, pos_embed_scale=1.0))

    x, t, x_torch, t_torch = _inputs(seed=3)
    rng = np.random.default_rng(4)
    ctx = rng.standard_normal((B, ctx_len, ctx_dim)).astype(np.float32)
    pooled = rng.standard_normal((B, pooled_dim)).astype(np.float32)
    with torch.no_grad():
        want = _nchw_to_nhwc(
            ref(
                x_torch,
                encoder_hidden_states=torch.from_numpy(ctx),
                pooled_projections=torch.from_numpy(pooled),
                timestep=t_torch,
            ).sample  # fmt: skip
        )
    got = model(jnp.asarray(x), jnp.asarray(t), context_BxTxE=jnp.asarray(ctx), pooled_BxP=jnp.asarray(pooled))
    got = np.asarray(got)
    assert got.shape == want.shape == (B, SIZE, SIZE, C)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_converter_rejects_mismatched_checkpoints():
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=C, out_channels=2 * C,
        num_layers=DEPTH, sample_size=SIZE, patch_size=PATCH, num_embeds_ada_norm=10,
    )  # fmt: skip
    cfg = ModelConfig(
        arch="dit", image_size=SIZE, in_channels=C, patch_size=PATCH, hidden_size=HEADS * HEAD_DIM,
        depth=DEPTH, num_heads=HEADS, num_classes=10, learn_sigma=True,
    )  # fmt: skip
    # A fresh diffusers DiT has independent per-block embedders; ours cannot hold them.
    with pytest.raises(ValueError, match="differs from block 0"):
        dit_from_diffusers(ref, cfg)
    ref.transformer_blocks[1].norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    with pytest.raises(ValueError, match="Shape mismatch for final.linear"):
        dit_from_diffusers(ref, dataclasses.replace(cfg, learn_sigma=False))  # checkpoint has 2C outputs
    sd = dict(ref.state_dict(), extra_tensor=torch.zeros(3))
    with pytest.raises(ValueError, match="extra_tensor"):
        dit_from_diffusers(sd, cfg)
