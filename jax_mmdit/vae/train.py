"""`mmdit train-vae`: a small AutoencoderKL trained on a registered dataset, written as a
diffusers-format directory that `mmdit encode` takes like a published VAE.

mmdit train-vae --dataset fashion_mnist --resolution 32 --out vaes/fashion_mnist

The loss is the VAE's evidence bound without the perceptual and adversarial terms of the published
VAEs: squared reconstruction error plus `kl_weight` times the posterior's KL divergence from N(0, 1),
both summed per image and divided by its pixel count. When training ends, the latents of a sample
of training images fix the config's `shift_factor` and `scaling_factor` (their mean and 1/std, as
SD's 0.18215 was found), and the held-out split's reconstruction error is measured and saved with
the weights (`train_vae.json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_mmdit.data.config import DataConfig
from jax_mmdit.data.pipeline import pick_split
from jax_mmdit.data.registry import get_spec
from jax_mmdit.data.sources import HFRecords, load_splits
from jax_mmdit.errors import UserError
from jax_mmdit.vae.config import VAEConfig
from jax_mmdit.vae.model import AutoencoderKL
from jax_mmdit.vae.weights import save_vae

# Seeds of the independent random streams (mixed with TrainVAEConfig.seed).
_INIT, _BATCHES, _FLIPS, _NOISE, _STATS = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class TrainVAEConfig:
    dataset: str = "fashion_mnist"  # a name from `mmdit datasets`
    source: str | None = None  # as --data.source; None = the dataset's local copy or hub id
    resolution: int = 32  # images are resized/cropped to this side (a multiple of the downsampling)
    block_out_channels: tuple[int, ...] = (16, 32, 32)  # three levels: 4x downsampling (~0.15 s/step on 2 cores)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3  # AdamW, cosine decay to 10% after a 100-step warmup
    kl_weight: float = 1e-4  # KL (summed over latents) relative to squared error (summed over pixels)
    max_examples: int | None = None  # train on the first N images only
    eval_examples: int = 1000  # held-out images for the reconstruction error
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for name in ("resolution", "steps", "batch_size", "eval_examples"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}.")
        f = 2 ** (len(self.block_out_channels) - 1)
        if self.resolution % f:
            raise UserError(f"--resolution {self.resolution} is not a multiple of the downsampling factor {f}.")
        if self.learning_rate <= 0 or self.kl_weight < 0:
            raise UserError("--learning_rate must be positive and --kl_weight non-negative.")


def _records(cfg: TrainVAEConfig):
    """(train, held-out) images of the dataset, decoded into memory."""
    spec = get_spec(cfg.dataset)
    splits, _ = load_splits(spec, cfg.source, cfg.resolution)
    data = DataConfig(name=cfg.dataset, source=cfg.source, max_examples=cfg.max_examples)
    out = []
    for split in ("train", "eval"):
        records = pick_split(splits, spec, data, split)
        out.append(records.decode_all()[0] if isinstance(records, HFRecords) else records)
    return out


def _to_float(u8):
    return jnp.asarray(u8, jnp.float32) * (2 / 255) - 1


def train_vae(cfg: TrainVAEConfig) -> tuple[AutoencoderKL, VAEConfig, dict[str, Any]]:
    spec = get_spec(cfg.dataset)
    train, held_out = _records(cfg)
    vcfg = VAEConfig(
        in_channels=spec.channels,
        out_channels=spec.channels,
        latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=1.0,
        sample_size=cfg.resolution,
    )
    model = AutoencoderKL(vcfg, rngs=nnx.Rngs(jax.random.fold_in(jax.random.key(cfg.seed), _INIT)))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, min(100, cfg.steps // 10 + 1), cfg.steps, cfg.learning_rate * 0.1
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    pixels = cfg.resolution**2 * spec.channels

    @nnx.jit(donate_argnums=(0, 1))
    def step(model, opt, u8_BxHxWxC, rng):
        x = _to_float(u8_BxHxWxC)

        def loss_fn(model):
            recon, mean, logvar = model(x, rng)
            rec = jnp.sum((recon - x) ** 2, axis=(1, 2, 3))
            kl = 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
            return jnp.mean(rec + cfg.kl_weight * kl) / pixels, (jnp.mean(rec) / pixels, jnp.mean(kl))

        (loss, (rec, kl)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return {"loss": loss, "mse": rec, "kl": kl}

    from tqdm.auto import tqdm

    batches = np.random.default_rng((cfg.seed, _BATCHES))
    flips = np.random.default_rng((cfg.seed, _FLIPS))
    key = jax.random.fold_in(jax.random.key(cfg.seed), _NOISE)
    bar = tqdm(range(cfg.steps), desc="train-vae", dynamic_ncols=True)
    start = time.perf_counter()
    for i in bar:
        images, _ = train.read(np.sort(batches.integers(0, len(train), cfg.batch_size)))
        if spec.flip:
            mirror = flips.random(len(images)) < 0.5
            images[mirror] = images[mirror, :, ::-1]
        metrics = step(model, opt, images, jax.random.fold_in(key, i))
        if (i + 1) % 50 == 0 or i + 1 == cfg.steps:  # the only host syncs of the loop
            bar.set_postfix({k: f"{float(v):.4g}" for k, v in metrics.items()})
    train_seconds = time.perf_counter() - start

    encode = nnx.jit(lambda m, x: m.encode(_to_float(x)))
    recon = nnx.jit(lambda m, x: m.decode(m.encode(_to_float(x))[0]))
    # The latents' statistics, from up to 2048 training images: z = mean + std * eps, as training sees.
    idx = np.arange(min(len(train), 2048))
    stats_key = jax.random.fold_in(jax.random.key(cfg.seed), _STATS)
    zs = []
    for s in range(0, len(idx), 256):
        mean, logvar = encode(model, train.read(idx[s : s + 256])[0])
        noise = jax.random.normal(jax.random.fold_in(stats_key, s), mean.shape)
        zs.append(np.asarray(mean + jnp.exp(0.5 * logvar) * noise))
    z = np.concatenate(zs)
    vcfg = dataclasses.replace(vcfg, shift_factor=float(z.mean()), scaling_factor=float(1.0 / z.std()))
    sq_err, n = 0.0, min(len(held_out), cfg.eval_examples)
    for s in range(0, n, 256):
        u8 = held_out.read(np.arange(s, min(s + 256, n)))[0]
        out = np.clip(np.asarray(recon(model, u8)), -1, 1)
        sq_err += float(np.sum((out - np.asarray(_to_float(u8))) ** 2))
    mse = sq_err / (n * pixels)
    report = {
        "dataset": cfg.dataset,
        "config": {**dataclasses.asdict(cfg), "block_out_channels": list(cfg.block_out_channels)},
        "train_examples": len(train),
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": float(metrics["loss"]),
        "eval_examples": n,
        "eval_mse": mse,  # per pixel, images in [-1, 1]
        "eval_psnr_db": 10 * math.log10(4.0 / mse),  # peak-to-peak 2
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
    }
    return model, vcfg, report


def cmd_train_vae(argv: list[str]) -> int:
    d = TrainVAEConfig()
    p = argparse.ArgumentParser(prog="mmdit train-vae", description="Train a small AutoencoderKL on a dataset.")
    p.add_argument("--out", default=None, help="the VAE directory to write (default vaes/DATASET-RESOLUTION)")
    for f in dataclasses.fields(TrainVAEConfig):
        default = getattr(d, f.name)
        if isinstance(default, tuple):
            p.add_argument(f"--{f.name}", type=int, nargs="+", default=default)
        else:
            kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
            p.add_argument(f"--{f.name}", type=kind, default=default, help=f"default {default}")
    a = vars(p.parse_args(argv))
    out = Path(a.pop("out") or f"vaes/{a['dataset']}-{a['resolution']}")
    if out.exists():  # checked before minutes of training, not after
        raise UserError(f"{out} already exists; the VAE is written to a new directory (--out).")
    cfg = TrainVAEConfig(**a)
    model, vcfg, report = train_vae(cfg)
    save_vae(model, vcfg, out, extra_files={"train_vae.json": json.dumps(report, indent=1)})
    side = cfg.resolution // vcfg.downsample_factor
    print(
        f"[mmdit] VAE saved to {out}: held-out reconstruction MSE {report['eval_mse']:.5f} "
        f"(PSNR {report['eval_psnr_db']:.2f} dB) on {report['eval_examples']} images, latents "
        f"{side}x{side}x{vcfg.latent_channels}, "
        f"scaling_factor {vcfg.scaling_factor:.4f}; trained in {report['train_seconds']} s"
    )
    return 0
