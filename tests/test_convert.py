"""Published checkpoint files -> our models (`models.checkpoints.load_published`), against diffusers.

The original facebookresearch/DiT `.pt` layout is made from a randomised diffusers DiT by the
inverse of diffusers' `scripts/convert_dit_to_diffusers.py`; diffusers directories come from
`save_pretrained`. Every weight is randomised, so a wrong mapping changes the output.
"""

import argparse
import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from jax_mmdit.errors import UserError  # noqa: E402
from jax_mmdit.models import ModelConfig  # noqa: E402
from jax_mmdit.models.checkpoints import (  # noqa: E402
    diffusers_dit_config,
    load_published,
    original_dit_config,
    read_safetensors,
)
from jax_mmdit.models.convert import dit_from_original  # noqa: E402

TOL = 1e-4
B, C, NUM_CLASSES = 3, 4, 10
# DiT-S width: the original layout does not record num_heads, the paper's table (384 -> 6) does.
DIT_SIZE, DIT_HEADS, DIT_HEAD_DIM, DEPTH = 8, 6, 64, 2
SD3_SIZE, SD3_HEADS, SD3_HEAD_DIM, CTX_DIM, POOLED_DIM, CTX_LEN = 16, 2, 32, 24, 16, 5


def _randomise(module, seed: int, std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _inputs(size: int, seed: int):
    rng = np.random.default_rng(seed)
    x_BxHxWxC = rng.standard_normal((B, size, size, C)).astype(np.float32)
    t_B = np.array([0.0, 0.375, 1.0], np.float32)
    x_torch = torch.from_numpy(x_BxHxWxC.transpose(0, 3, 1, 2).copy())
    return x_BxHxWxC, t_B, x_torch, torch.from_numpy(t_B * np.float32(1000.0))


def _nchw_to_nhwc(out) -> np.ndarray:
    return out.detach().numpy().transpose(0, 2, 3, 1)


def _to_original(ref) -> dict:
    """diffusers DiT state dict -> facebookresearch/DiT key names (inverse of diffusers' script)."""
    sd = ref.state_dict()
    used = set()

    def take(key):
        used.add(key)
        return sd[key].clone()

    emb = "transformer_blocks.0.norm1.emb."
    out = {"pos_embed": ref.pos_embed.pos_embed.clone()}  # a non-persistent buffer in diffusers
    pairs = [("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", emb + "timestep_embedder.linear_1"),
             ("t_embedder.mlp.2", emb + "timestep_embedder.linear_2"),
             ("final_layer.adaLN_modulation.1", "proj_out_1"), ("final_layer.linear", "proj_out_2")]  # fmt: skip
    for i in range(DEPTH):
        o, s = f"blocks.{i}.", f"transformer_blocks.{i}."
        pairs += [(o + "attn.proj", s + "attn1.to_out.0"), (o + "adaLN_modulation.1", s + "norm1.linear"),
                  (o + "mlp.fc1", s + "ff.net.0.proj"), (o + "mlp.fc2", s + "ff.net.2")]  # fmt: skip
        for leaf in ("weight", "bias"):
            out[f"{o}attn.qkv.{leaf}"] = torch.cat([take(f"{s}attn1.to_{n}.{leaf}") for n in "qkv"])
    for ours, theirs in pairs:
        for leaf in ("weight", "bias"):
            out[f"{ours}.{leaf}"] = take(f"{theirs}.{leaf}")
    out["y_embedder.embedding_table.weight"] = take(emb + "class_embedder.embedding_table.weight")
    # Blocks 1.. hold copies of block 0's embedder (asserted equal by the fixture).
    left = {k for k in sd if k not in used and not (".norm1.emb." in k and not k.startswith("transformer_blocks.0."))}
    assert not left, left
    return out


@pytest.fixture(scope="module")
def dit_ref():
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=DIT_HEADS, attention_head_dim=DIT_HEAD_DIM, in_channels=C, out_channels=2 * C,
        num_layers=DEPTH, sample_size=DIT_SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_eps=1e-6,
    ).eval()  # fmt: skip
    _randomise(ref, seed=0, std=0.03)
    for blk in ref.transformer_blocks[1:]:  # DiT shares one embedder
        blk.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
    for blk in ref.transformer_blocks:  # the original sinusoid (diffusers' port uses shift 1): documented gap
        blk.norm1.emb.time_proj.downscale_freq_shift = 0
    x, t, x_torch, t_torch = _inputs(DIT_SIZE, seed=1)
    y = np.array([3, 0, NUM_CLASSES], np.int32)  # includes the null class
    with torch.no_grad():
        want = _nchw_to_nhwc(ref(x_torch, timestep=t_torch, class_labels=torch.from_numpy(y).long()).sample)
    assert 0.1 < np.abs(want).max() < 100  # neither near zero nor so large that fp32 rounding exceeds TOL
    return ref, (x, t, y), want


@pytest.fixture(scope="module")
def dit_files(dit_ref, tmp_path_factory):
    """The original layout saved plain and as a DiT training checkpoint (train.py saves args as a Namespace)."""
    ref = dit_ref[0]
    folder = tmp_path_factory.mktemp("dit")
    sd = _to_original(ref)
    torch.save(sd, folder / "plain.pt")
    not_ema = {k: v + 1.0 for k, v in sd.items()}  # "model" differs: only "ema" gives the reference's output
    ddp = {f"module.{k}": v for k, v in sd.items()}
    args = argparse.Namespace(model="DiT-S/2", image_size=DIT_SIZE * 8, num_classes=NUM_CLASSES)
    torch.save({"model": not_ema, "ema": ddp, "opt": {}, "args": args}, folder / "train.pt")
    return folder, sd


def _dit_out(model, inputs) -> np.ndarray:
    x, t, y = inputs
    return np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))


@pytest.fixture(scope="module")
def dit_model(dit_files):
    return load_published("dit", dit_files[0] / "plain.pt")


def test_original_dit_matches_diffusers(dit_ref, dit_model):
    _, inputs, want = dit_ref
    cfg, model = dit_model
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.patch_size) == (384, 6, DEPTH, 2)  # heads from the paper
    assert (cfg.image_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma) == (DIT_SIZE, C, NUM_CLASSES, True)
    assert cfg.time_scale == 1000.0
    np.testing.assert_allclose(_dit_out(model, inputs), want, atol=TOL, rtol=0)


def test_training_checkpoint_reads_ema_without_ddp_prefix(dit_ref, dit_files, dit_model):
    _, inputs, _ = dit_ref
    cfg, model = load_published("dit", dit_files[0] / "train.pt")
    assert cfg == dit_model[0]
    np.testing.assert_array_equal(_dit_out(model, inputs), _dit_out(dit_model[1], inputs))


def test_sit_embeds_unscaled_time(dit_ref, dit_files, dit_model):
    x, _, y = dit_ref[1]
    cfg, sit = load_published("sit", dit_files[0] / "plain.pt")
    assert cfg.time_scale == 1.0 and cfg.learn_sigma
    t_B = np.array([0.0, 0.125, 0.75], np.float32)  # t and t * 1000 are exact in float32
    got = _dit_out(sit, (x, t_B * np.float32(1000.0), y))
    np.testing.assert_array_equal(got, _dit_out(dit_model[1], (x, t_B, y)))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    path = tmp_path / "evil.pt"
    torch.save({"ema": {"w": torch.zeros(2)}, "args": Payload()}, path)
    with pytest.raises(UserError, match=r"not a plain weights file and was not loaded .*GLOBAL exec"):
        load_published("dit", path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unsafe load does run the payload
    assert marker.exists()


def test_original_dit_errors(dit_files, tmp_path):
    folder, sd = dit_files
    with pytest.raises(UserError, match=r"hidden_size 768 != 384, depth 12 != 2"):
        load_published("dit", folder / "plain.pt", preset="DiT-B/2")
    with pytest.raises(UserError, match=r"Preset DiT-S/2 does not match .*: depth 12 != 2\."):
        load_published("dit", folder / "plain.pt", preset="DiT-S/2")
    assert load_published("dit", folder / "plain.pt", num_heads=12)[0].num_heads == 12
    with pytest.raises(UserError, match="not a file"):
        load_published("dit", tmp_path / "missing.pt")
    (tmp_path / "cut.pt").write_bytes((folder / "plain.pt").read_bytes()[:4096])  # an interrupted download
    with pytest.raises(UserError, match="Cannot read .* as a PyTorch checkpoint"):
        load_published("sit", tmp_path / "cut.pt")
    cfg, _ = load_published("dit", folder / "plain.pt", image_size=2 * DIT_SIZE)  # a sin-cos table of the new grid
    assert cfg.image_size == 2 * DIT_SIZE
    bad = dict(sd, pos_embed=sd["pos_embed"] * 1.01)
    with pytest.raises(UserError, match="not DiT's fixed 2D sin-cos table"):
        dit_from_original(bad, cfg)


def test_preset_must_match_shapes():
    """Shapes alone (no weights): a DiT-S/2-shaped state dict at 256 px."""
    shapes = {"x_embedder.proj.weight": (384, 4, 2, 2), "pos_embed": (1, 256, 384),
              "t_embedder.mlp.0.weight": (384, 256), "y_embedder.embedding_table.weight": (1001, 384),
              "final_layer.linear.weight": (32, 384)}  # fmt: skip
    shapes.update({f"blocks.{i}.mlp.fc1.weight": (1536, 384) for i in range(12)})
    sd = {k: np.empty(v, np.float32) for k, v in shapes.items()}
    cfg = original_dit_config(sd, time_scale=1000.0, preset="DiT-S/2")
    assert (cfg.num_heads, cfg.depth, cfg.image_size, cfg.num_classes, cfg.learn_sigma) == (6, 12, 32, 1000, True)
    with pytest.raises(UserError, match="Preset DiT-S/2 has 6 heads, not the num_heads 12"):
        original_dit_config(sd, time_scale=1000.0, preset="DiT-S/2", num_heads=12)
    with pytest.raises(UserError, match=r"arch 'mmdit' != 'dit'"):
        original_dit_config(sd, time_scale=1000.0, preset="MMDiT-S/2")
    sd["x_embedder.proj.weight"] = np.empty((320, 4, 2, 2), np.float32)
    with pytest.raises(UserError, match="Width 320 is not in the DiT paper's table"):
        original_dit_config(sd, time_scale=1000.0)


@pytest.fixture(scope="module")
def dit_dirs(dit_ref, tmp_path_factory):
    ref = dit_ref[0]
    single, sharded = tmp_path_factory.mktemp("dit_single"), tmp_path_factory.mktemp("dit_sharded")
    ref.save_pretrained(single)
    ref.save_pretrained(sharded, max_shard_size="2MB")
    return single, sharded


def test_diffusers_dit_directory(dit_ref, dit_dirs, dit_model):
    _, inputs, want = dit_ref
    single, sharded = dit_dirs
    assert (single / "diffusion_pytorch_model.safetensors").is_file()
    cfg, model = load_published("diffusers-dit", single)
    assert cfg == dit_model[0]
    got = _dit_out(model, inputs)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)

    index = json.loads((sharded / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    np.testing.assert_array_equal(_dit_out(load_published("diffusers-dit", sharded)[1], inputs), got)


def test_diffusers_dit_fp16_variant(dit_ref, tmp_path):
    ref, inputs, _ = dit_ref
    half = copy.deepcopy(ref).half()
    half.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    rounded = half.float()  # the reference with the file's fp16-rounded weights
    rounded.pos_embed.pos_embed = ref.pos_embed.pos_embed  # a buffer, not in the file: keep it exact
    x, t, y = inputs
    with torch.no_grad():
        x_torch, t_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t * np.float32(1000))
        want = _nchw_to_nhwc(rounded(x_torch, timestep=t_torch, class_labels=torch.from_numpy(y).long()).sample)
    np.testing.assert_allclose(_dit_out(load_published("diffusers-dit", tmp_path)[1], inputs), want, atol=TOL, rtol=0)


def test_bf16_safetensors_read_without_torch(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(3, 5).bfloat16()
    save_file({"w": w}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    np.testing.assert_array_equal(np.asarray(read_safetensors(tmp_path)["w"], np.float32), w.float().numpy())


def test_published_transformer2d_config():
    """facebook/DiT-XL-2-256's transformer/config.json names the older Transformer2DModel class."""
    config = {
        "_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0", "activation_fn": "gelu-approximate",
        "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0,
        "in_channels": 4, "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero",
        "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
        "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 32,
        "upcast_attention": False, "use_linear_projection": False,
    }  # fmt: skip
    cfg = diffusers_dit_config(config)
    want = ModelConfig.from_preset("DiT-XL/2", image_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert cfg == want


def test_diffusers_dit_errors(dit_dirs, tmp_path):
    single, sharded = dit_dirs
    config = json.loads((single / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="has no diffusion_pytorch_model.safetensors"):
        load_published("diffusers-dit", tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        load_published("diffusers-dit", single.parent)
    with pytest.raises(UserError, match="norm_type='ada_norm'"):
        diffusers_dit_config({**config, "norm_type": "ada_norm"})
    with pytest.raises(UserError, match="new_norm_option"):
        diffusers_dit_config({**config, "new_norm_option": True})
    with pytest.raises(UserError, match="SD3Transformer2DModel"):
        load_published("sd3", single)
    index = json.loads((sharded / "diffusion_pytorch_model.safetensors.index.json").read_text())
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="lacks the weight shard"):
        load_published("diffusers-dit", tmp_path)


@pytest.fixture(scope="module")
def sd35_pipeline(tmp_path_factory):
    """A tiny SD3.5-style transformer (QK-norm, dual attention in block 0) in a pipeline folder."""
    ref = diffusers.SD3Transformer2DModel(
        sample_size=SD3_SIZE, patch_size=2, in_channels=C, num_layers=DEPTH, attention_head_dim=SD3_HEAD_DIM,
        num_attention_heads=SD3_HEADS, joint_attention_dim=CTX_DIM, caption_projection_dim=SD3_HEADS * SD3_HEAD_DIM,
        pooled_projection_dim=POOLED_DIM, out_channels=C, pos_embed_max_size=12, qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ).eval()  # fmt: skip
    _randomise(ref, seed=2, std=0.1)
    folder = tmp_path_factory.mktemp("sd35")
    ref.save_pretrained(folder / "transformer")
    return ref, folder


@pytest.mark.parametrize("size", [SD3_SIZE, SD3_SIZE // 2])  # the smaller one: another crop of SD3's table
def test_sd35_dual_attention_matches_diffusers(sd35_pipeline, size):
    ref, folder = sd35_pipeline
    cfg, model = load_published("sd3", folder, image_size=None if size == SD3_SIZE else size)
    assert cfg.dual_attention_layers == (0,) and cfg.qk_norm and cfg.image_size == size
    x, t, x_torch, t_torch = _inputs(size, seed=3)
    rng = np.random.default_rng(4)
    ctx = rng.standard_normal((B, CTX_LEN, CTX_DIM)).astype(np.float32)
    pooled = rng.standard_normal((B, POOLED_DIM)).astype(np.float32)
    with torch.no_grad():
        out = ref(x_torch, encoder_hidden_states=torch.from_numpy(ctx), pooled_projections=torch.from_numpy(pooled),
                  timestep=t_torch).sample  # fmt: skip
    want = _nchw_to_nhwc(out)
    got = model(jnp.asarray(x), jnp.asarray(t), context_BxTxE=jnp.asarray(ctx), pooled_BxP=jnp.asarray(pooled))
    got = np.asarray(got)
    assert got.shape == want.shape == (B, size, size, C)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_load_published_rejects_unknown_kind_and_preset_for_directories(sd35_pipeline):
    with pytest.raises(UserError, match="Unknown checkpoint kind"):
        load_published("flux", sd35_pipeline[1])
    with pytest.raises(UserError, match="drop preset/num_heads"):
        load_published("sd3", sd35_pipeline[1], preset="MMDiT-S/2")
    with pytest.raises(UserError, match="exceeds SD3's position table"):
        load_published("sd3", sd35_pipeline[1], image_size=26)
