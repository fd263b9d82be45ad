"""Latent diffusion's data path on a slice of real Fashion-MNIST, with a tiny random VAE: `mmdit
encode` writes shards and a manifest that read back to exactly the VAE's posterior, resumes after
kill -9, splits shards over processes, skips corrupt images; training batches are fresh posterior
samples normalised once; a run checks it decodes with the VAE that encoded its latents."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jax_mmdit.data import DataConfig, build_dataset
from jax_mmdit.data.latents import MANIFEST, LatentRecords, latent_normalization, read_manifest, shard_name
from jax_mmdit.data.sources import center_crop_arr
from jax_mmdit.errors import UserError
from jax_mmdit.vae import AutoencoderKL, VAEConfig, load_vae, save_vae
from jax_mmdit.vae.codec import LatentCodec, VaeRunner, run_latent_info
from jax_mmdit.vae.encode import cmd_encode

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY = VAEConfig(
    in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16
)
N, RES, SHARD = 40, 16, 16  # 3 shards: 16 + 16 + 8 images, latents 8x8x4


def _vae(path: Path, seed: int) -> Path:
    save_vae(AutoencoderKL(TINY, rngs=nnx.Rngs(seed)), TINY, path)
    return path


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return _vae(tmp_path_factory.mktemp("vae") / "vae", 0)


def _args(vae, out, *extra, n=N):
    return ["--vae", str(vae), "--out", str(out), "--dataset", "fashion_mnist", "--max_examples", str(n),
            "--resolution", str(RES), "--shard_size", str(SHARD), "--batch_size", "8", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def latents(vae, tmp_path_factory):
    out = tmp_path_factory.mktemp("lat") / "fm"
    assert cmd_encode(_args(vae, out)) == 0
    return out


def _fashion_images(n):
    from jax_mmdit.data.registry import get_spec
    from jax_mmdit.data.sources import load_splits

    splits, _ = load_splits(get_spec("fashion_mnist"), None, RES)
    return splits["train"].read(np.arange(n))


def test_shards_hold_the_posterior_of_each_image_and_its_mirror(vae, latents):
    m = read_manifest(latents)
    assert m["num_examples"] == N and [s["count"] for s in m["shards"]] == [16, 16, 8]
    assert m["latent_shape"] == [8, 8, 4] and m["variants"] == 2 and m["skipped"] == 0
    assert m["vae"]["config"] == TINY.to_dict() and len(m["class_names"]) == 10
    images, labels = _fashion_images(N)
    model, _ = load_vae(vae)
    runner = VaeRunner(model, 8)
    mean, std = runner.encode(images)
    mean_f, std_f = runner.encode(images[:, :, ::-1])
    moments, got_labels = LatentRecords(latents, m).read(np.arange(N))
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_allclose(moments[:, 0, 0], mean, atol=1e-6)
    np.testing.assert_allclose(moments[:, 0, 1], std, atol=1e-6)
    np.testing.assert_allclose(moments[:, 1, 0], mean_f, atol=1e-6)
    np.testing.assert_allclose(moments[:, 1, 1], std_f, atol=1e-6)
    both_mean = np.concatenate([mean, mean_f]).reshape(-1, 4)
    var = both_mean.var(0) + (np.concatenate([std, std_f]) ** 2).reshape(-1, 4).mean(0)
    np.testing.assert_allclose(m["channel_mean"], both_mean.mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["channel_std"], np.sqrt(var), rtol=1e-4)


def test_batches_are_fresh_posterior_samples_normalised_once(latents):
    m = read_manifest(latents)
    cfg = DataConfig(name="fashion_mnist", source=str(latents), eval_fraction=0.25)
    ds = build_dataset(cfg, "train")
    assert ds.info.is_latent and ds.info.image_shape == (8, 8, 4) and ds.info.num_examples == 30
    it = ds.iterator(30, seed=0, shuffle=False)
    a, b = next(it), next(it)
    shift, scale = latent_normalization(m, "vae")
    assert shift == [0.0] * 4 and scale == [TINY.scaling_factor] * 4
    moments, _ = LatentRecords(latents, m).select(ds.records.indices).read(np.arange(30))
    z = a["image"] / np.float32(TINY.scaling_factor)
    # Each example is mean + std * eps of its image or of its mirror (random flips), eps ~ N(0, 1).
    eps = [(z - moments[:, v, 0]) / moments[:, v, 1] for v in (0, 1)]
    fits = [np.abs(e).reshape(30, -1).max(1) < 6 for e in eps]
    assert (fits[0] | fits[1]).all() and fits[0].any() and fits[1].any()
    eps_flat = np.where(fits[0][:, None, None, None], eps[0], eps[1])
    assert abs(eps_flat.mean()) < 0.05 and abs(eps_flat.std() - 1) < 0.05
    assert not np.allclose(a["image"], b["image"])  # a new draw each epoch
    whole = build_dataset(DataConfig(name="fashion_mnist", source=str(latents), latent_norm="channel"), "eval")
    x = next(whole.iterator(whole.info.num_examples, seed=0, shuffle=False))["image"]
    np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=0.5)  # "channel": each channel ~ N(0, 1)


def test_worker_processes_stream_the_same_latent_batches(latents):
    ds = build_dataset(DataConfig(name="fashion_mnist", source=str(latents)), "train")
    with ds.iterator(8, seed=3, num_workers=0) as it:
        expected = [next(it) for _ in range(3)]
    with ds.iterator(8, seed=3, num_workers=2) as it:  # each worker opens the shards itself
        for want in expected:
            got = next(it)
            assert np.array_equal(got["image"], want["image"]) and np.array_equal(got["label"], want["label"])


def test_resume_after_kill_9_skips_done_shards(vae, latents, tmp_path):
    out = tmp_path / "killed"
    slow = (  # the VAE made slow so the kill lands in the middle of the second shard
        "import sys, time; from jax_mmdit.vae import codec; enc = codec.VaeRunner.encode; "
        "codec.VaeRunner.encode = lambda self, x: (time.sleep(0.5), enc(self, x))[1]; "
        "from jax_mmdit.vae.encode import cmd_encode; cmd_encode(sys.argv[1:])"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", slow, *_args(vae, out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    first = out / "shard-00000.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    assert not (out / MANIFEST).exists() and not (out / "shard-00002.json").exists()
    with pytest.raises(UserError, match="incomplete"):
        build_dataset(DataConfig(name="fashion_mnist", source=str(out)), "train")
    done = (out / shard_name(0)).stat().st_mtime_ns
    assert cmd_encode(_args(vae, out)) == 0
    assert (out / shard_name(0)).stat().st_mtime_ns == done  # not re-encoded
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    for i in range(3):
        assert (out / shard_name(i)).read_bytes() == (latents / shard_name(i)).read_bytes()
    with pytest.raises(UserError, match="different encoding .*resolution 16 -> 32"):
        args = _args(vae, out)
        args[args.index("--resolution") + 1] = "32"
        cmd_encode(args)  # the finished directory, asked for other settings


def test_processes_split_the_shards(vae, latents, tmp_path, monkeypatch):
    from jax.experimental import multihost_utils

    out = tmp_path / "two"
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    cmd_encode(_args(vae, out))
    assert sorted(f for f in os.listdir(out) if f.startswith("shard")) == [
        "shard-00001.array_record",
        "shard-00001.json",
    ]
    assert not (out / MANIFEST).exists()  # process 0 writes it, once every shard is done
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    cmd_encode(_args(vae, out))
    mine, one = json.loads((out / MANIFEST).read_text()), json.loads((latents / MANIFEST).read_text())
    assert {k: v for k, v in mine.items() if k != "created"} == {k: v for k, v in one.items() if k != "created"}


def test_corrupt_image_is_skipped_and_counted(vae, tmp_path, capsys):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(folder / cls / f"{i}.png")
    (folder / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "lat"
    args = [
        "--vae",
        str(vae),
        "--out",
        str(out),
        "--dataset",
        "imagenet",
        "--source",
        str(folder),
        "--resolution",
        "16",
    ]
    assert cmd_encode(args) == 0
    m = read_manifest(out)
    assert m["num_examples"] == 6 and m["skipped"] == 1 and "broken.png" in m["skipped_names"][0]
    assert "skipped" in capsys.readouterr().err
    # ADM preprocessing: the short side resized to 16, centre crop; grayscale for a 1-channel VAE.
    moments, labels = LatentRecords(out, m).read(np.arange(6))
    first = center_crop_arr(Image.open(folder / "a" / "0.png"), 16, 1)
    model, _ = load_vae(vae)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(VaeRunner(model, 8).encode(first[None])[0][0], moments[0, 0, 0], atol=1e-5)
    with pytest.raises(UserError, match="not empty and not a latent directory"):
        cmd_encode(["--vae", str(vae), "--out", str(folder), "--dataset", "imagenet", "--source", str(folder)])


def test_a_run_decodes_only_with_the_vae_that_encoded_it(vae, latents, tmp_path):
    m = read_manifest(latents)
    info = run_latent_info(m, *latent_normalization(m, "vae"), str(latents))
    codec = LatentCodec(info)
    z = np.random.default_rng(0).standard_normal((3, 8, 8, 4)).astype(np.float32)
    u8 = codec.to_uint8(z)
    assert u8.shape == (3, 16, 16, 1) and u8.dtype == np.uint8
    model, _ = load_vae(vae)
    x = np.asarray(jax.jit(lambda z: model.decode(z))(z / np.float32(TINY.scaling_factor)))
    np.testing.assert_array_equal(u8, np.round((np.clip(x, -1, 1) + 1) * 127.5).astype(np.uint8))
    other = _vae(tmp_path / "other", 1)
    with pytest.raises(UserError, match="Mismatched VAE"):
        LatentCodec(info, str(other))
    with pytest.raises(UserError, match="is not at"):
        LatentCodec(info, str(tmp_path / "gone"))


def test_latents_carry_the_captions_of_their_images(latents, fm_captions):
    """Captions line up with the latents of the images they were written for."""
    from jax_mmdit.data.captions import TEXT_KEYS, read_text_manifest

    data = build_dataset(DataConfig(name="fashion_mnist", source=str(latents), captions=str(fm_captions)), "train")
    texts, class_prompts = data.table.texts(), read_text_manifest(fm_captions)["class_prompts"]
    everything = data.table.gather(np.arange(len(texts)))["context_BxTxE"]
    batch = next(data.iterator(8, seed=0))
    assert set(batch) == {"image", "label", *TEXT_KEYS}
    for tokens, y in zip(batch["context_BxTxE"], batch["label"]):
        (match,) = np.flatnonzero(np.abs(everything - tokens).max(axis=(1, 2)) == 0)
        assert texts[match].endswith(class_prompts[y].split(" of ")[-1])
