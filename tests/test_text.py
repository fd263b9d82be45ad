"""Text conditioning: encoders built from transformers configs with random weights (no downloads)
against transformers itself, SD3's layout, and the MMDiT's text mask."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_mmdit.errors import UserError
from jax_mmdit.models import ModelConfig, create_model
from jax_mmdit.ops import resolve

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_text import save_encoders  # noqa: E402

from jax_mmdit.text import TextEncoder, TextEncoderConfig, identity  # noqa: E402


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return save_encoders(tmp_path_factory.mktemp("text"))


PROMPTS = ["a photo of a sandal", "a black-and-white picture of the bag", ""]


def test_clip_tokens_and_pooled_are_transformers_outputs(encoders):
    enc = TextEncoder(TextEncoderConfig(clip=(str(encoders["clip_l"]),), clip_max_length=12, batch_size=2))
    out = enc.encode(PROMPTS)
    tok = transformers.AutoTokenizer.from_pretrained(encoders["clip_l"].parent / "tokenizer")
    ids = tok(PROMPTS, padding="max_length", max_length=12, return_tensors="pt")
    ref = transformers.CLIPTextModelWithProjection.from_pretrained(encoders["clip_l"]).eval()
    with torch.no_grad():
        want = ref(input_ids=ids["input_ids"], output_hidden_states=True)
    assert out.tokens_BxTxE.shape == (3, 12, 32) and out.pooled_BxP.shape == (3, 24)
    np.testing.assert_allclose(out.tokens_BxTxE, want.hidden_states[-2].numpy(), atol=1e-5)
    np.testing.assert_allclose(out.pooled_BxP, want.text_embeds.numpy(), atol=1e-5)
    np.testing.assert_array_equal(out.mask_BxT, ids["attention_mask"].numpy().astype(bool))
    assert out.mask_BxT.sum(1).tolist() == [7, 8, 2]  # bos + words + eos; batches of 2 joined in order
    assert enc.context_dim == 32 and enc.pooled_dim == 24


def test_sd3_layout_clips_side_by_side_then_t5_along_the_sequence(encoders):
    cfg = TextEncoderConfig(clip=(str(encoders["clip_l"]), str(encoders["clip_g"])), t5=str(encoders["t5"]),
                            clip_max_length=12, t5_max_length=10)  # fmt: skip
    enc = TextEncoder(cfg)
    out = enc.encode(PROMPTS)
    assert (enc.context_dim, enc.pooled_dim, enc.max_length) == (96, 64, 22)
    assert out.tokens_BxTxE.shape == (3, 22, 96) and out.pooled_BxP.shape == (3, 64)
    alone_l = TextEncoder(dataclasses.replace(cfg, clip=cfg.clip[:1], t5=None)).encode(PROMPTS)
    alone_g = TextEncoder(dataclasses.replace(cfg, clip=cfg.clip[1:], t5=None)).encode(PROMPTS)
    alone_t5 = TextEncoder(dataclasses.replace(cfg, clip=())).encode(PROMPTS)
    np.testing.assert_allclose(out.tokens_BxTxE[:, :12, :32], alone_l.tokens_BxTxE, atol=1e-6)
    np.testing.assert_allclose(out.tokens_BxTxE[:, :12, 32:80], alone_g.tokens_BxTxE, atol=1e-6)
    assert not out.tokens_BxTxE[:, :12, 80:].any()  # the CLIPs (80 wide) zero-padded to T5's 96
    np.testing.assert_allclose(out.tokens_BxTxE[:, 12:], alone_t5.tokens_BxTxE, atol=1e-6)
    np.testing.assert_allclose(out.pooled_BxP, np.concatenate([alone_l.pooled_BxP, alone_g.pooled_BxP], 1))
    np.testing.assert_array_equal(out.mask_BxT, np.concatenate([alone_l.mask_BxT, alone_t5.mask_BxT], 1))
    assert alone_t5.pooled_BxP is None
    ident = identity(cfg)
    assert ident["t5"]["path"].endswith("text_encoder_3") and len(ident["clip"]) == 2


def test_encoder_errors_are_one_line(tmp_path, encoders):
    with pytest.raises(UserError, match="at least one"):
        TextEncoderConfig()
    with pytest.raises(UserError, match="no config.json"):
        TextEncoder(TextEncoderConfig(t5=str(tmp_path)))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((encoders["clip_l"] / "config.json").read_text())
    with pytest.raises(UserError, match="No tokenizer"):
        TextEncoder(TextEncoderConfig(clip=(str(bare),)))


@pytest.mark.parametrize("kernels", ["xla", "onednn"])
def test_padding_the_caption_leaves_the_image_output_unchanged(kernels):
    cfg = ModelConfig(arch="mmdit", image_size=8, in_channels=4, patch_size=2, hidden_size=32, depth=2,
                      num_heads=2, num_classes=0, context_dim=16, pooled_dim=8, qk_norm=True)  # fmt: skip
    model = create_model(cfg, nnx.Rngs(0), resolve(kernels))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(1)  # numpy: no compilation per parameter shape
    model = nnx.merge(
        graphdef, jax.tree.map(lambda p: jnp.asarray(0.2 * rng.standard_normal(p.shape), p.dtype), params), rest
    )
    k = jax.random.split(jax.random.key(2), 5)
    x, t = jax.random.normal(k[0], (2, 8, 8, 4)), jnp.array([0.3, 0.8])
    real = jax.random.normal(k[1], (2, 3, 16))
    pooled = jax.random.normal(k[2], (2, 8))
    short = jnp.concatenate([real, jax.random.normal(k[3], (2, 2, 16))], 1)  # 3 real + 2 pad tokens
    long = jnp.concatenate([real, jax.random.normal(k[4], (2, 9, 16))], 1)  # 3 real + 9 other pad tokens
    mask = lambda n: jnp.arange(n)[None, :].repeat(2, 0) < 3  # noqa: E731
    run = nnx.jit(lambda m, c, k: m(x, t, context_BxTxE=c, pooled_BxP=pooled, context_mask_BxT=k))
    a = run(model, short, mask(5))
    b = run(model, long, mask(12))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    unmasked = run(model, long, None)
    assert np.abs(np.asarray(unmasked) - np.asarray(a)).max() > 1e-3  # without the mask the pads do count
    with pytest.raises(ValueError, match="context_mask"):
        model(x, t, context_BxTxE=short, pooled_BxP=pooled, context_mask_BxT=mask(4))
    # A model configured as SD3 (context_mask off) attends to the padding whatever mask it is given.
    model.cfg = dataclasses.replace(cfg, context_mask=False)
    ignored = model(x, t, context_BxTxE=long, pooled_BxP=pooled, context_mask_BxT=mask(12))
    np.testing.assert_allclose(np.asarray(ignored), np.asarray(unmasked), atol=1e-5)


def _sd3_pipeline(root, encoders_from, with_t5=True):
    """A tiny SD3 pipeline directory: transformer/, vae/ and the text encoders of `encoders_from`."""
    import shutil

    from diffusers import SD3Transformer2DModel

    from jax_mmdit.vae import AutoencoderKL, VAEConfig, save_vae

    for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") + (
        ("text_encoder_3", "tokenizer_3") if with_t5 else ()
    ):
        shutil.copytree(encoders_from / name, root / name)
    torch.manual_seed(1)
    ref = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=96,
                                caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=8)  # fmt: skip
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape) * 0.1)
    ref.save_pretrained(root / "transformer")
    vae_cfg = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, sample_size=16)  # fmt: skip
    save_vae(AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)), vae_cfg, root / "vae")
    return ref


@pytest.mark.parametrize("with_t5", [True, False])
def test_sd3_run_samples_from_a_prompt_as_the_sd3_pipeline_conditions(encoders, tmp_path, with_t5):
    """convert an SD3 pipeline -> the run's prompt condition equals SD3's own `encode_prompt`, and
    the converted model on it equals diffusers' transformer; `sample_prompts` decodes images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from jax_mmdit.train.convert import convert
    from jax_mmdit.train.trainer import Trainer

    root = tmp_path / "sd3"
    ref = _sd3_pipeline(root, encoders["clip_l"].parent, with_t5)
    run = convert("sd3", str(root), str(tmp_path / "run"), vae=str(root / "vae"))
    trainer = Trainer.load(str(run))
    trainer.prompts.info["encoder"]["t5_max_length"] = 10  # a short T5 sequence for the test (SD3: 256)
    cond, null = trainer.prompts(PROMPTS[:2], negative="")

    load = lambda sub: getattr(transformers, sub).from_pretrained  # noqa: E731
    pipe = StableDiffusion3Pipeline(
        transformer=ref, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=load("CLIPTextModelWithProjection")(root / "text_encoder"),
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder_2=load("CLIPTextModelWithProjection")(root / "text_encoder_2"),
        tokenizer_2=transformers.AutoTokenizer.from_pretrained(root / "tokenizer_2"),
        text_encoder_3=load("T5EncoderModel")(root / "text_encoder_3") if with_t5 else None,
        tokenizer_3=transformers.AutoTokenizer.from_pretrained(root / "tokenizer_3") if with_t5 else None,
    )  # fmt: skip
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(
            PROMPTS[:2], None, None, device="cpu", negative_prompt="", max_sequence_length=10
        )
    assert "context_mask_BxT" not in cond  # SD3 attends to its padding, and so does its converted run
    np.testing.assert_allclose(cond["context_BxTxE"], emb.numpy(), atol=1e-5)
    np.testing.assert_allclose(cond["pooled_BxP"], pooled.numpy(), atol=1e-5)
    np.testing.assert_allclose(null["context_BxTxE"][0], neg.numpy()[0], atol=1e-5)
    np.testing.assert_allclose(null["pooled_BxP"][0], neg_pooled.numpy()[0], atol=1e-5)

    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([0.25, 0.75], np.float32)
    got = trainer.ema_model()(jnp.asarray(x), jnp.asarray(t), **jax.tree.map(jnp.asarray, cond))
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), encoder_hidden_states=emb,
                   pooled_projections=pooled, timestep=torch.from_numpy(t * 1000)).sample  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), atol=1e-4)

    scfg = dataclasses.replace(trainer.cfg.sampler, num_steps=2, cfg_scale=3.0)
    u8 = trainer.sample_prompts(PROMPTS[:2], sampler_cfg=scfg)
    assert u8.shape == (2, 16, 16, 1) and u8.dtype == np.uint8
    other = trainer.sample_prompts(PROMPTS[:2], negative="a photo of a bag", sampler_cfg=scfg)
    assert np.abs(other.astype(int) - u8).max() > 0  # the negative prompt steers guidance
    # An encoder replaced since conversion is refused before it encodes anything.
    import json

    from jax_mmdit.text.run import PromptConditioner

    cfg_file = root / "text_encoder_2" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "projection_dim": 41}))
    with pytest.raises(UserError, match="not the one this run recorded"):
        PromptConditioner(trainer.prompts.info)(["a photo of a bag"])


def test_sd3_fine_tunes_on_captioned_latents_of_its_own_vae_and_encoders(encoders, tmp_path):
    """A converted SD3 run is fine-tuned (--init_from) on latents of its VAE with captions encoded by
    its encoders, attending to padding as SD3 does; the fine-tuned run samples from prompts."""
    from jax_mmdit.checkpoint import load_config_dict
    from jax_mmdit.config import EvalConfig, OptimConfig, TrainConfig
    from jax_mmdit.data import DataConfig
    from jax_mmdit.text.encode import cmd_encode_text
    from jax_mmdit.train.convert import convert
    from jax_mmdit.train.trainer import Trainer
    from jax_mmdit.vae.encode import cmd_encode

    root = tmp_path / "sd3"
    _sd3_pipeline(root, encoders["clip_l"].parent)
    run = convert("sd3", str(root), str(tmp_path / "run"), vae=str(root / "vae"))
    lat, caps = tmp_path / "lat", tmp_path / "caps"
    assert cmd_encode(["--vae", str(root / "vae"), "--out", str(lat), "--dataset", "fashion_mnist", "--max_examples",
                       "40", "--resolution", "16", "--batch_size", "20", "--no-flip"]) == 0  # fmt: skip
    text_args = ["--dataset", "fashion_mnist", "--templates", "default", "--clip", str(root / "text_encoder"),
                 "--clip", str(root / "text_encoder_2"), "--t5", str(root / "text_encoder_3"),
                 "--clip_max_length", "16", "--t5_max_length", "10", "--out", str(caps)]  # fmt: skip
    assert cmd_encode_text(text_args) == 0
    base = TrainConfig.from_dict(load_config_dict(str(run))[0])
    assert base.model.context_mask is False
    cfg = dataclasses.replace(
        base, data=DataConfig(name="fashion_mnist", source=str(lat), captions=str(caps)), init_from=str(run),
        run_dir=str(tmp_path / "ft"), max_steps=2, batch_size=8, n_eval_batches=0, eval_save_steps=2,
        sample_every_n=0, num_sample_images=2, log_every=1, eval=EvalConfig(evaluators=("loss",)),
        optim=OptimConfig(learning_rate=1e-7, warmup_steps=0), mesh=dataclasses.replace(base.mesh),
        sampler=dataclasses.replace(base.sampler, num_steps=2),
    )  # fmt: skip
    trainer = Trainer(cfg)
    last = trainer.train()
    assert np.isfinite(last["train/loss"])
    src = Trainer.load(str(run))
    for a, b in zip(jax.tree.leaves(src.state.ema_params), jax.tree.leaves(trainer.state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)  # started from SD3's weights
    import json

    info = json.loads((tmp_path / "ft" / "text_encoder.json").read_text())
    assert info["use_mask"] is False and len(info["encoder"]["clip"]) == 2
    u8 = Trainer.load(str(tmp_path / "ft")).sample_prompts(["a photo of a sandal"])
    assert u8.shape == (1, 16, 16, 1)
