"""The `mmdit` command: train, sample, eval, fid-stats, train-classifier, train-vae, encode,
encode-text, convert, profile, info, datasets.

mmdit train --config fashion_mnist --optim.learning_rate 1e-3 --mesh.fsdp 2
mmdit encode --vae sd-vae-ft-ema --dataset imagenet --source ~/ILSVRC/train --out latents/imagenet256
mmdit sample --run runs/fashion_mnist --class 3 --cfg 4 --steps 50 --out x.png
mmdit sample --run runs/fashion_mnist --num 1000 --out samples.npz
mmdit info --model DiT-XL/2 --image_size 32 --in_channels 4 --num_classes 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path

from jax_mmdit import runtime

USAGE = """usage: mmdit COMMAND [options]

  train             train a model (typed config; any field can be overridden, see `mmdit train --help`)
  sample            draw images from a trained run (PNG grid, GIF or an .npz)
  eval              sample a run and score it: classifier accuracy/FD (offline) or FID/IS/precision/recall
  fid-stats         Inception reference statistics of a dataset, cached for FID
  train-classifier  train a dataset's small evaluation CNN (the offline metric)
  train-vae         train a small VAE on a dataset (a diffusers-format directory, for `encode`)
  encode            images -> VAE latent shards, for latent diffusion (`train --data.source DIR`)
  encode-text       captions -> text-encoder embeddings, for text-to-image (`train --data.captions DIR`)
  convert           a published DiT/SiT/SD3 checkpoint -> a run directory (sample it, --init_from it)
  profile           a few training steps: FLOPs per step, FLOP/s, MFU, memory, a jax.profiler trace
  info              parameter count and forward GFLOPs of a model preset
  datasets          list the named datasets

latent diffusion: a VAE (a published diffusers directory, or `mmdit train-vae`), then
  mmdit encode --vae VAE --dataset NAME --source IMAGES --resolution 256 --out LATENTS
  mmdit train --config PRESET --data.source LATENTS
  mmdit sample --run RUN --out samples.png            (decoded with the run's VAE)

text-to-image: captions (a text column, sidecar .txt/.json files, or --templates) -> embeddings
  mmdit encode-text --dataset NAME --caption_column text --clip CLIP_DIR --out CAPTIONS
  mmdit train --config fashion_mnist_text --data.captions CAPTIONS
  mmdit sample --run RUN --prompt "a photo of a sandal" --out sandal.png

published weights: convert, sample, fine-tune (a new class count or image size is allowed)
  mmdit convert --from dit DiT-XL-2-256x256.pt --vae VAE --out runs/dit-xl2
  mmdit sample --run runs/dit-xl2 --class 207 360 --out samples.png
  mmdit train --config runs/dit-xl2 --init_from runs/dit-xl2 --data.source LATENTS --run_dir runs/ft
  mmdit convert --from sd3 SD3_PIPELINE_DIR --vae SD3_PIPELINE_DIR/vae --out runs/sd3
  mmdit sample --run runs/sd3 --prompt "a photo of a cat" --out cat.png
"""


def _parse_train_config(argv: list[str], prog: str):
    import tyro

    from jax_mmdit.config import PRESETS

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="fashion_mnist", help=f"preset {sorted(PRESETS)} or a run directory")
    known, rest = pre.parse_known_args(argv)
    base = _base_config(known.config)
    return tyro.cli(
        type(base),
        default=base,
        args=rest,
        prog=f"{prog} --config {known.config}",
        use_underscores=True,
        description=f"Train (preset {known.config!r}; every field overridable).",
    )


def _base_config(name: str):
    """A preset by name, or the config of a run directory (`mmdit convert`'s, or any run's)."""
    from jax_mmdit.config import PRESETS, TrainConfig, get_config
    from jax_mmdit.errors import UserError

    if name in PRESETS or not (Path(name).expanduser() / "config.json").is_file():
        return get_config(name)
    path = Path(name).expanduser() / "config.json"
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"Cannot read the run's config {path}: {e}.") from None


def cmd_train(argv: list[str], prog="mmdit train") -> int:
    cfg = _parse_train_config(argv, prog)
    from jax_mmdit.train.trainer import Trainer

    trainer = Trainer(cfg)
    if cfg.profile:
        return _print_profile(trainer)
    last = trainer.train()
    if last:
        keep = lambda k: k in ("train/loss", "perf/img_per_s") or (k.startswith("eval/") and not k.endswith("_real"))  # noqa: E731
        shown = {k: round(v, 5) for k, v in last.items() if keep(k)}
        print(
            f"[mmdit] done at step {trainer.step}: {shown}; samples in {Path(cfg.run_dir) / 'samples'}, "
            f"TensorBoard: tensorboard --logdir {Path(cfg.run_dir) / 'tb'}"
        )
    return 0


def _print_profile(trainer) -> int:
    from jax_mmdit.train.profiler import profile_training

    report = profile_training(trainer)
    width = max(len(k) for k in report)
    for k, v in report.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        print(f"{k:<{width}}  {'n/a' if v is None else v}")
    return 0


def cmd_profile(argv: list[str]) -> int:
    return cmd_train(["--profile", *argv], prog="mmdit profile")


def cmd_sample(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmdit sample", description="Sample from a trained run's EMA model.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (latest checkpoint)")
    src.add_argument("--checkpoint", help="a checkpoint step directory: RUN/checkpoints/STEP")
    p.add_argument("--class", dest="labels", type=int, nargs="*", help="class label(s); default one per class")
    p.add_argument("--prompt", nargs="+", default=None, help="text run: prompt(s), one image each")
    p.add_argument("--negative_prompt", default="", help="text run: what guidance steers away from")
    p.add_argument("--num", type=int, default=None, help="number of images (labels cycle over classes)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--method", choices=["euler", "heun", "ddpm", "ddim", "meanflow"], default=None,
                   help="euler/heun: flow runs; ddpm/ddim: DDPM ones (converted DiT); meanflow")  # fmt: skip
    p.add_argument("--cfg_channels", type=int, default=None,
                   help="guide only the first k channels (DiT/SiT's reported FIDs used 3)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256, help="images per sampling call")
    p.add_argument("--out", default="samples.png", help=".png (grid), .gif (trajectory) or .npz (uint8 + labels)")
    p.add_argument("--vae", default=None, help="a latent run's VAE directory, if it moved since training")
    a = p.parse_args(argv)

    import numpy as np

    from jax_mmdit.errors import UserError
    from jax_mmdit.eval import images as imgs
    from jax_mmdit.flow import check_sampler_fits
    from jax_mmdit.train.trainer import Trainer

    run, step = a.run, None
    if a.checkpoint:
        ck = Path(a.checkpoint)
        run, step = str(ck.parent.parent), int(ck.name) if ck.name.isdigit() else None
        if step is None:
            raise UserError(f"--checkpoint must be RUN/checkpoints/STEP, got {a.checkpoint}.")
    out = _output_path(a.out, (".png", ".gif", ".npz"))
    if a.num is not None and a.num < 1:
        raise UserError(f"--num must be at least 1, got {a.num}.")
    trainer = Trainer.load(run, step)
    if a.vae:
        trainer.decoder.use_vae(a.vae)
    text = trainer.model_cfg.context_dim > 0
    if text != (a.prompt is not None):
        need = "--prompt (a text-conditioned run)" if text else "--class, not --prompt (a class-conditional run)"
        raise UserError(f"This run samples with {need}.")
    pairs = (("cfg_scale", a.cfg), ("num_steps", a.steps), ("method", a.method), ("cfg_channels", a.cfg_channels))
    overrides = {k: v for k, v in pairs if v is not None}
    scfg = dataclasses.replace(trainer.cfg.sampler, **overrides)
    check_sampler_fits(trainer.cfg.flow, scfg)
    n_cls = trainer.model_cfg.num_classes
    if text:
        if out.suffix == ".gif":
            raise UserError("--out for a text run is a .png grid or an .npz.")
        prompts = [a.prompt[i % len(a.prompt)] for i in range(a.num or len(a.prompt))]
        x_u8 = trainer.sample_prompts(prompts, a.negative_prompt, a.seed, scfg, a.batch)
        _save_samples(out, x_u8, np.zeros(len(prompts), np.int32), prompts, prompts)
        print(
            f"[mmdit] wrote {len(prompts)} samples (cfg {scfg.cfg_scale}, {scfg.num_steps} {scfg.method} steps) "
            f"to {out}"
        )
        return 0
    labels = trainer.sample_labels(a.num or len(a.labels or ()) or n_cls or 16, a.labels)
    if out.suffix == ".gif":
        x, traj = trainer.sample(labels, seed=a.seed, sampler_cfg=scfg, return_trajectory=True)
        traj_u8 = trainer.decoder.trajectory(traj)
        imgs.save_trajectory_gif(out, traj_u8, ncols=min(len(labels), 10))
    else:
        chunks = []
        for i in range(0, len(labels), a.batch):
            chunks.append(trainer.sample(labels[i : i + a.batch], seed=a.seed + i, sampler_cfg=scfg))
        x_u8 = trainer.decoder(np.concatenate(chunks))
        _save_samples(out, x_u8, labels, trainer.captions(labels))
    print(
        f"[mmdit] wrote {len(labels)} samples (step {trainer.step}, cfg {scfg.cfg_scale}, "
        f"{scfg.num_steps} {scfg.method} steps) to {out}"
    )
    return 0


def _save_samples(out: Path, x_u8, labels, captions, prompts=None) -> None:
    """A PNG grid (with captions) or an .npz of uint8 images, labels (and the prompts)."""
    import numpy as np

    from jax_mmdit.eval import images as imgs

    if out.suffix == ".npz":
        extra = {} if prompts is None else {"prompts": np.asarray(prompts)}
        with imgs.atomic_path(out) as tmp:
            np.savez_compressed(tmp, images=x_u8, labels=labels.astype(np.int32), **extra)
    else:
        imgs.save_grid_png(out, x_u8, ncols=min(len(x_u8), 10), scale=2, captions=captions)


def _output_path(path: str, suffixes: tuple[str, ...]) -> Path:
    """`path` checked before any work: a known suffix, and a directory we can write into."""
    from jax_mmdit.errors import UserError

    out = Path(path)
    if out.suffix not in suffixes:
        raise UserError(f"--out {path!r} must end in {', '.join(suffixes)} (that picks what is written).")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"Cannot write --out {path!r}: {e.strerror} ({e.filename or out.parent}).") from None
    return out


def cmd_info(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mmdit info", description="Parameters and forward GFLOPs of a model.")
    p.add_argument("--model", default="DiT-XL/2", help="preset, e.g. DiT-S/2, DiT-XL/2, MMDiT-B/2")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--in_channels", type=int, default=4)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--learn_sigma", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--kernels",
        choices=["auto", "xla", "onednn"],
        default="auto",
        help="backend whose compiled forward is counted (the count is the same maths on each)",
    )
    p.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto", help="attention implementation")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    from jax_mmdit import ops
    from jax_mmdit.models import ModelConfig
    from jax_mmdit.models.summary import model_summary

    kw = dict(image_size=a.image_size, in_channels=a.in_channels, num_classes=a.num_classes)
    if a.learn_sigma is not None:
        kw["learn_sigma"] = a.learn_sigma
    cfg = ModelConfig.from_preset(a.model, **kw)
    s = model_summary(cfg, ops.resolve(a.kernels, a.attention))
    if a.json:
        print(json.dumps(s, indent=2, default=str))
    else:
        width = max(len(k) for k in s)
        for k, v in s.items():
            v = f"{v:,}" if isinstance(v, int) else (f"{v:.4g}" if isinstance(v, float) else v)
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_datasets(argv: list[str]) -> int:
    from jax_mmdit.data import DATASETS

    for name, spec in sorted(DATASETS.items()):
        print(f"{name:<15} {spec}")
    return 0


def _eval_command(name: str):
    def run(argv: list[str]) -> int:
        from jax_mmdit.eval import commands

        return getattr(commands, name)(argv)

    return run


def _vae_command(module: str, name: str):
    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(f"jax_mmdit.vae.{module}"), name)(argv)

    return run


def _convert(argv: list[str]) -> int:
    from jax_mmdit.train.convert import cmd_convert

    return cmd_convert(argv)


def _encode_text(argv: list[str]) -> int:
    from jax_mmdit.text.encode import cmd_encode_text

    return cmd_encode_text(argv)


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "eval": _eval_command("cmd_eval"),
    "fid-stats": _eval_command("cmd_fid_stats"),
    "train-classifier": _eval_command("cmd_train_classifier"),
    "train-vae": _vae_command("train", "cmd_train_vae"),
    "encode": _vae_command("encode", "cmd_encode"),
    "encode-text": _encode_text,
    "convert": _convert,
    "profile": cmd_profile,
    "info": cmd_info,
    "datasets": cmd_datasets,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if not os.environ.get("MMDIT_DEBUG"):
        # Ctrl-C while starting up (nothing is saved yet) ends the process at once and quietly: a
        # KeyboardInterrupt raised inside an import or a library callback prints tracebacks. The
        # training loop installs its own handler, which saves first (train/rundir.py).
        signal.signal(signal.SIGINT, _interrupted)
    try:
        runtime.configure()
        return run_guarded(COMMANDS[argv[0]], argv[1:])
    except KeyboardInterrupt:  # a second Ctrl-C in the training loop: abort without saving
        if os.environ.get("MMDIT_DEBUG"):
            raise
        _interrupted()


def _interrupted(*_) -> None:
    print("\nmmdit: interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def run_guarded(fn, argv) -> int:
    """A `UserError` (bad config or input, missing data or checkpoint, NaN loss) → one line, exit 1;
    any other exception is a bug and keeps its traceback."""
    from jax_mmdit.errors import UserError

    try:
        return fn(argv)
    except UserError as e:
        if os.environ.get("MMDIT_DEBUG"):
            raise
        print(f"mmdit: error: {e}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # A failed Orbax/TensorStore read leaves async threads that print tracebacks during
        # interpreter teardown; nothing is left to save, so skip the teardown.
        os._exit(1)


def entry() -> int:
    """The `mmdit` command: `main` in a process that uses jemalloc where it helps (runtime.use_jemalloc)."""
    runtime.use_jemalloc()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
