"""`mmdit convert`: a published checkpoint -> a run directory that `mmdit sample` reads and
`mmdit train --init_from` starts from.

    mmdit convert --from dit DiT-XL-2-256x256.pt --vae sd-vae-ft-ema --out runs/dit-xl2-256
    mmdit convert --from sit SiT-XL-2-256x256.pt --vae sd-vae-ft-ema --out runs/sit-xl2-256
    mmdit convert --from sd3 stable-diffusion-3-medium-diffusers --vae .../vae --out runs/sd3-medium

The run holds the converted weights as step 0 (parameters and EMA both, a fresh optimizer state),
the config of the network with the objective it was trained with and its authors' sampling
settings, and, with --vae, the VAE that decodes its latents (`latents.json`). The directory is
written under a temporary name and renamed when complete: it appears whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from jax_mmdit.errors import UserError
from jax_mmdit.models.checkpoints import KINDS, load_published


def published_config(kind: str, model_cfg, run_dir: str):
    """The TrainConfig of a converted checkpoint: its network, the objective it was trained with,
    its authors' sampling settings and (for fine-tuning) DiT's optimiser recipe."""
    from jax_mmdit.config import OptimConfig, TrainConfig
    from jax_mmdit.data import DataConfig
    from jax_mmdit.eval.config import EvalConfig
    from jax_mmdit.flow import FlowConfig, SamplerConfig

    # DiT and SiT guided 3 of the 4 latent channels for their reported FIDs ("for exact
    # reproducibility", their code says); cfg_channels None guides all of them.
    channels = 3 if model_cfg.in_channels > 3 else None
    if kind in ("dit", "diffusers-dit"):
        # DiT-XL/2-256's FID 2.27: 250 DDPM steps, guidance 1.5.
        flow = FlowConfig(objective="ddpm", timestep_sampling="uniform")
        sampler = SamplerConfig(method="ddpm", num_steps=250, cfg_scale=1.5, cfg_channels=channels)
    elif kind == "sit":
        # SiT-XL/2's ODE results used an adaptive dopri5; Heun at 125 steps is 250 evaluations.
        flow = FlowConfig(objective="sit", timestep_sampling="uniform")
        sampler = SamplerConfig(method="heun", num_steps=125, cfg_scale=1.5, cfg_channels=channels)
    else:
        # SD3-medium's defaults: 28 Euler steps, shift 3, logit-normal training times.
        flow = FlowConfig(shift=3.0)
        sampler = SamplerConfig(method="euler", num_steps=28, cfg_scale=7.0, shift=3.0)
    # Latent models: where `mmdit encode` puts ImageNet-256 latents (a fine-tune points
    # --data.source at its own); a pixel model reads the dataset itself.
    latent = model_cfg.in_channels not in (1, 3)
    data = DataConfig(name="imagenet", source="./latents/imagenet256" if latent else None)
    return TrainConfig(
        model=model_cfg,
        flow=flow,
        sampler=sampler,
        data=data,
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, ema_decay=0.9999),
        eval=EvalConfig(evaluators=("loss",)),
        batch_size=256,
        run_dir=run_dir,
    )


def _latent_info(vae: str, model_cfg) -> dict:
    """`latents.json` for a run whose model samples `vae`'s scaled latents (z * scaling_factor)."""
    from jax_mmdit.vae.codec import run_latent_info
    from jax_mmdit.vae.weights import read_config, vae_identity

    vae_cfg = read_config(vae)
    if vae_cfg.latent_channels != model_cfg.in_channels:
        raise UserError(
            f"The VAE at {vae} has {vae_cfg.latent_channels} latent channels; the model takes {model_cfg.in_channels}."
        )
    C = model_cfg.in_channels
    manifest = {
        "vae": vae_identity(vae),
        "latent_shape": [model_cfg.image_size, model_cfg.image_size, C],
        "resolution": model_cfg.image_size * 2 ** (len(vae_cfg.block_out_channels) - 1),
    }
    shift = [float(vae_cfg.shift_factor or 0.0)] * C
    return run_latent_info(manifest, shift, [float(vae_cfg.scaling_factor)] * C, "")


def _text_info(checkpoint: str, model_cfg) -> dict | None:
    """SD3's text encoders when `checkpoint` is (or sits in) a pipeline directory that has them."""
    from jax_mmdit.text.run import check_fits, pipeline_text_encoders, run_text_info

    path = Path(checkpoint).expanduser()
    for root in (path, path.parent):
        enc = pipeline_text_encoders(root, width=model_cfg.context_dim)
        if enc is not None:
            check_fits(enc, model_cfg)
            return run_text_info(enc, use_mask=False)  # SD3 attends to its padding
    print(f"[mmdit] {path} has no text_encoder*/ folders: the run cannot encode prompts.")
    return None


def write_run(cfg, model, out: str | Path, meta: dict, latent_info: dict | None = None,
              text_info: dict | None = None) -> Path:  # fmt: skip
    """A run directory at `out` (absent or empty) holding `model`'s weights as step 0, `cfg`,
    `latent_info` and `text_info`; written under a temporary name, then renamed."""
    import jax

    from jax_mmdit.checkpoint import Checkpointer
    from jax_mmdit.text.run import RUN_TEXT
    from jax_mmdit.train.rundir import write_atomically
    from jax_mmdit.train.trainer import Trainer
    from jax_mmdit.vae.codec import RUN_LATENTS

    target = Path(out).expanduser()
    if target.exists() and any(target.iterdir()):
        raise UserError(f"{target} already exists and is not empty; convert into a new directory.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.converting"
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion that died midway
    try:
        trainer = Trainer(cfg, devices=jax.local_devices(), with_data=False, distributed=False, model=model)
        ckpt = Checkpointer(tmp, keep=1, async_save=False)
        ckpt.save(0, trainer.state, None, cfg.to_json(), {"data": None, **meta})
        ckpt.finish()
        ckpt.close()
        write_atomically(tmp / "config.json", cfg.to_json())
        if latent_info is not None:
            write_atomically(tmp / RUN_LATENTS, json.dumps(latent_info, indent=2))
        if text_info is not None:
            write_atomically(tmp / RUN_TEXT, json.dumps(text_info, indent=2))
        if target.exists():
            target.rmdir()  # empty, checked above
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert(kind: str, checkpoint: str, out: str, preset: str | None = None, image_size: int | None = None,
            vae: str | None = None) -> Path:  # fmt: skip
    """Convert `checkpoint` (a file or directory of format `kind`) into the run directory `out`."""
    from jax_mmdit.models import count_params

    target = Path(out).expanduser()
    if target.exists() and any(target.iterdir()):  # checked before the (slow) reading, too
        raise UserError(f"{target} already exists and is not empty; convert into a new directory.")
    model_cfg, model = load_published(kind, checkpoint, preset=preset, image_size=image_size)
    if vae is None and model_cfg.in_channels not in (1, 3):
        raise UserError(
            f"This model takes {model_cfg.in_channels}-channel latents: pass --vae DIR, the VAE that decodes them "
            "(sd-vae-ft-ema for DiT/SiT, the vae/ folder of an SD3 pipeline)."
        )
    cfg = published_config(kind, model_cfg, str(target))
    info = _latent_info(vae, model_cfg) if vae else None
    text = _text_info(checkpoint, model_cfg) if kind == "sd3" else None
    n_params = count_params(model)["total"]
    meta = {"converted_from": {"kind": kind, "source": str(Path(checkpoint).expanduser())}}
    write_run(cfg, model, target, meta, info, text)
    print(
        f"[mmdit] converted {checkpoint} ({n_params / 1e6:.1f}M params, objective {cfg.flow.objective}, "
        f"{cfg.sampler.num_steps} {cfg.sampler.method} steps) to {target}"
    )
    return target


def cmd_convert(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mmdit convert",
        description="Convert a published DiT/SiT/SD3 checkpoint into a run directory (mmdit sample, --init_from).",
    )
    p.add_argument("--from", dest="kind", required=True, choices=KINDS,
                   help="dit/sit: the authors' .pt file; diffusers-dit/sd3: a diffusers directory")  # fmt: skip
    p.add_argument("checkpoint", help="the .pt file or the diffusers (pipeline or transformer) directory")
    p.add_argument("--out", required=True, help="the run directory to write (must not exist)")
    p.add_argument("--model", default=None, help="preset it must match, e.g. DiT-XL/2 (default: read from shapes)")
    p.add_argument("--image_size", type=int, default=None, help="sd3: latent size to run at (default sample_size)")
    p.add_argument("--vae", default=None, help="the VAE directory that decodes its latents (recorded in the run)")
    a = p.parse_args(argv)
    convert(a.kind, a.checkpoint, a.out, a.model, a.image_size, a.vae)
    return 0
