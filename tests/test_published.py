"""Run directories from published weights: `mmdit convert`'s run holds the model exactly, samples
through `mmdit sample`, and `--init_from` fine-tunes it with a new class count and image size."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_mmdit.errors import UserError
from jax_mmdit.models import ModelConfig, create_model
from jax_mmdit.train.convert import published_config, write_run
from jax_mmdit.train.init_from import load_init_params
from jax_mmdit.train.step import split_model
from jax_mmdit.train.trainer import Trainer

SRC = ModelConfig(arch="dit", image_size=4, in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                  num_classes=7, learn_sigma=True)  # fmt: skip


def _random_model(cfg: ModelConfig, seed: int):
    """A model with every parameter random (adaLN-Zero's zeros too), so outputs depend on all of them."""
    model = create_model(cfg, nnx.Rngs(seed))
    graphdef, params, rest = split_model(model)
    rng = np.random.default_rng(seed)  # numpy: no compilation per parameter shape
    params = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype), params)
    return nnx.merge(graphdef, params, rest)


def _write(tmp_path, cfg: ModelConfig, name="src", kind="dit"):
    model = _random_model(cfg, seed=1)
    run = write_run(published_config(kind, cfg, str(tmp_path / name)), model, tmp_path / name, {"converted_from": {}})
    return run, model


@pytest.fixture(scope="module")
def src_run(tmp_path_factory):
    """A converted DiT run written once (the model kept to compare with)."""
    return _write(tmp_path_factory.mktemp("published"), SRC)


def _flat(state) -> dict:
    return {jax.tree_util.keystr(p, simple=True, separator=".").removesuffix(".value"): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(state)}  # fmt: skip


def test_a_written_run_holds_the_model_and_its_objective(src_run):
    run, model = src_run
    trainer = Trainer.load(str(run))
    assert trainer.cfg.flow.objective == "ddpm" and trainer.cfg.sampler.method == "ddpm"
    assert trainer.cfg.sampler.cfg_channels == 3  # DiT's guidance, as its FIDs were measured
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
    t, y = jnp.array([0.1, 0.9]), jnp.array([3, 7])
    np.testing.assert_array_equal(np.asarray(trainer.ema_model()(x, t, y)), np.asarray(model(x, t, y)))
    with pytest.raises(UserError, match="not empty"):
        _write(run.parent, SRC)
    # Training into the converted directory itself is refused: it is weights, not a run to resume.
    with pytest.raises(UserError, match="--init_from"):
        trainer._check_resume(0, trainer.checkpointer.read_items(0))


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_init_from_keeps_every_weight_and_adapts_classes_and_size(src_run, tmp_path, pos_embed):
    src_cfg = dataclasses.replace(SRC, pos_embed=pos_embed)
    run, model = src_run if pos_embed == "sincos" else _write(tmp_path, src_cfg)
    dst_model = dataclasses.replace(src_cfg, num_classes=10, image_size=8)
    cfg = dataclasses.replace(published_config("dit", dst_model, str(tmp_path / "ft")), init_from=str(run))
    trainer = Trainer(cfg, with_data=False)
    fresh = _flat(trainer.state.params)
    params, note = load_init_params(str(run), cfg, trainer.state.params, trainer.mesh, trainer.ops)
    got, src = _flat(params), _flat(nnx.state(model, nnx.Param))
    assert "re-initialised for 10 classes" in note and "8²" in note
    for k, v in got.items():
        if k == "y_embedder.table.embedding":
            np.testing.assert_array_equal(v, fresh[k])  # a new class set: a new table
            assert v.shape == (11, 32)
        elif k == "pos_embed":  # learned: resized from the 2x2 grid to 4x4
            assert v.shape == (16, 32) and np.isfinite(v).all()
            np.testing.assert_allclose(v.mean(0), src[k].mean(0), atol=0.1)
        else:
            np.testing.assert_array_equal(v, src[k], err_msg=k)


def test_init_from_refuses_another_network_or_objective(src_run, tmp_path):
    run, _ = src_run
    wider = dataclasses.replace(SRC, hidden_size=64, num_heads=2)
    cfg = dataclasses.replace(published_config("dit", wider, str(tmp_path / "ft")), init_from=str(run))
    trainer = Trainer(cfg, with_data=False)
    with pytest.raises(UserError, match=r"model.hidden_size: 32 -> 64"):
        load_init_params(str(run), cfg, trainer.state.params, trainer.mesh, trainer.ops)
    cfg = dataclasses.replace(published_config("sit", SRC, str(tmp_path / "ft2")), init_from=str(run))
    trainer = Trainer(cfg, with_data=False)
    with pytest.raises(UserError, match="flow.objective: 'ddpm' -> 'sit'"):
        load_init_params(str(run), cfg, trainer.state.params, trainer.mesh, trainer.ops)
    # A resumed fine-tune may drop or change --init_from: it only starts a fresh run.
    from jax_mmdit.config import config_differences

    assert config_differences(cfg.to_dict(), dataclasses.replace(cfg, init_from=None)) == []


def test_sit_and_latent_runs_sample_and_decode(tmp_path):
    from jax_mmdit.train.convert import _latent_info
    from jax_mmdit.vae import AutoencoderKL, VAEConfig, save_vae

    vae_cfg = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, sample_size=8)  # fmt: skip
    vae = save_vae(AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0)), vae_cfg, tmp_path / "vae")
    sit_cfg = dataclasses.replace(SRC, time_scale=1.0)
    model = _random_model(sit_cfg, seed=2)
    cfg = published_config("sit", sit_cfg, str(tmp_path / "sit"))
    run = write_run(cfg, model, tmp_path / "sit", {"converted_from": {}}, _latent_info(str(vae), sit_cfg))
    trainer = Trainer.load(str(run))
    assert trainer.cfg.flow.objective == "sit" and trainer.cfg.sampler.method == "heun"
    scfg = dataclasses.replace(trainer.cfg.sampler, num_steps=3)
    u8 = trainer.sample_images(np.array([0, 6]), sampler_cfg=scfg, batch_size=2)
    assert u8.shape == (2, 8, 8, 1) and u8.dtype == np.uint8  # 4x4 latents decoded by the recorded VAE
    with pytest.raises(UserError, match="latent channels"):
        _latent_info(str(vae), dataclasses.replace(SRC, in_channels=16))
