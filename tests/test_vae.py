"""The VAE: parity with diffusers' AutoencoderKL (every weight randomised, fp32), the diffusers
directory format both ways, and the loader's errors."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from jax_mmdit.errors import UserError  # noqa: E402
from jax_mmdit.vae import VAE_PRESETS, AutoencoderKL, VAEConfig, load_vae, save_vae  # noqa: E402
from jax_mmdit.vae.weights import WEIGHTS  # noqa: E402

TOL = 1e-4
SIZE = 16
TINY = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=SIZE)
# The SD and SD3 families at tiny widths.
CONFIGS = {name: dataclasses.replace(VAE_PRESETS[name], **TINY) for name in ("sd", "sd3")}


def _reference(cfg: VAEConfig, path, seed: int = 0):
    """A diffusers AutoencoderKL of `cfg` with every weight random, saved at `path`."""
    d = cfg.to_diffusers()
    ref = diffusers.AutoencoderKL(**{k: v for k, v in d.items() if not k.startswith("_")}).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ref.save_pretrained(path, safe_serialization=True)
    return ref


def _close(ours, theirs):
    theirs = np.asarray(theirs)
    err = np.abs(np.asarray(ours) - theirs).max()
    assert err <= TOL * max(1.0, np.abs(theirs).max()), err


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(f"vae_{request.param}") / "vae"
    ref = _reference(cfg, path)
    model, loaded_cfg = load_vae(path)
    assert loaded_cfg == cfg
    return cfg, path, ref, model


def _images(n=2, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def test_encode_decode_match_diffusers(pair):
    cfg, _, ref, model = pair
    x = _images()
    with torch.no_grad():
        post = ref.encode(_nchw(x)).latent_dist
        z = np.random.default_rng(2).standard_normal(post.mean.shape).astype(np.float32)
        dec = ref.decode(torch.from_numpy(z)).sample
    mean, logvar = model.encode(jnp.asarray(x))
    assert mean.shape == (2, SIZE // cfg.downsample_factor, SIZE // cfg.downsample_factor, cfg.latent_channels)
    _close(mean, _nhwc(post.mean))
    _close(logvar, _nhwc(post.logvar))
    _close(model.decode(jnp.asarray(z.transpose(0, 2, 3, 1))), _nhwc(dec))


def test_bf16_decode_is_finite(pair):
    _, path, _, _ = pair
    model, cfg = load_vae(path, dtype=jnp.bfloat16)
    z = jax.random.normal(jax.random.key(0), (2, 8, 8, cfg.latent_channels))
    out = jax.jit(lambda m, z: m.decode(z))(model, z)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_legacy_attention_names_load(pair, tmp_path):
    cfg, path, _, model = pair
    legacy = {}
    for k, v in load_file(str(path / WEIGHTS)).items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f"attentions.0.{new}." in k:
                k, v = k.replace(new, old), v[..., None, None] if v.ndim == 2 else v  # ldm's 1x1 convs
        legacy[k] = v
    (tmp_path / "old").mkdir()
    save_file(legacy, str(tmp_path / "old" / WEIGHTS))
    (tmp_path / "old" / "config.json").write_text((path / "config.json").read_text())
    old, _ = load_vae(tmp_path / "old")
    x = jnp.asarray(_images())
    np.testing.assert_array_equal(old.encode(x)[0], model.encode(x)[0])


def test_save_vae_loads_in_diffusers(tmp_path):
    cfg = CONFIGS["sd"]
    model = AutoencoderKL(cfg, rngs=nnx.Rngs(3))
    save_vae(model, cfg, tmp_path / "mine")
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path / "mine").eval()
    z = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        dec = ref.decode(_nchw(z)).sample
    _close(model.decode(jnp.asarray(z)), _nhwc(dec))
    with pytest.raises(UserError, match="already exists"):
        save_vae(model, cfg, tmp_path / "mine")


def test_loader_names_what_is_wrong(pair, tmp_path):
    cfg, path, _, _ = pair
    with pytest.raises(UserError, match="no config.json"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(UserError, match="has no diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path)
    tensors = load_file(str(path / WEIGHTS))
    dropped = next(k for k in tensors if k.endswith("conv_out.weight"))
    save_file(
        {k: v for k, v in tensors.items() if k != dropped} | {"extra.weight": np.zeros(1)}, str(tmp_path / WEIGHTS)
    )
    with pytest.raises(UserError, match="lack 1 tensors"):
        load_vae(tmp_path)
    save_file(tensors | {"extra.weight": np.zeros(1, np.float32)}, str(tmp_path / WEIGHTS))
    with pytest.raises(UserError, match="extra.weight"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_diffusers() | {"up_block_types": ["AttnUpDecoderBlock2D"]}))
    with pytest.raises(UserError, match="Only UpDecoderBlock2D"):
        load_vae(tmp_path)


def test_presets_and_config_round_trip():
    assert VAE_PRESETS["sd"].downsample_factor == 8 and VAE_PRESETS["sd3"].latent_channels == 16
    for cfg in (*VAE_PRESETS.values(), *CONFIGS.values()):
        assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
        assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(UserError, match="multiples of norm_num_groups"):
        VAEConfig(block_out_channels=(8, 12), norm_num_groups=8)
