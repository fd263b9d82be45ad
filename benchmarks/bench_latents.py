"""Latent diffusion's two costs: VAE encode/decode speed, and memory while streaming latents.

    python -m benchmarks.bench_latents                 # both tables
    python -m benchmarks.bench_latents --only speed --vae sd --resolution 256 --batch 4
    python -m benchmarks.bench_latents --only memory --examples 1000

speed: images/s of our jitted AutoencoderKL (random weights, fp32) encoding and decoding, against
diffusers' PyTorch AutoencoderKL with the same weights in the same invocation (the ratio is what
to read: this machine is noisy). `--vae sd` is the SD/SDXL VAE at full width; `--vae small` the
`mmdit train-vae` default.

memory: peak RSS of a fresh process that opens a latent directory and reads batches from it, for a
directory of N and of 10N encoded images (`mmdit encode` of synthetic images through a tiny VAE).
Streaming from ArrayRecord shards, the peak must not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _small():
    from jax_mmdit.vae import VAEConfig
    from jax_mmdit.vae.train import TrainVAEConfig

    d = TrainVAEConfig()
    return VAEConfig(in_channels=1, out_channels=1, block_out_channels=d.block_out_channels,
                     layers_per_block=d.layers_per_block, norm_num_groups=d.norm_num_groups)  # fmt: skip


def speed(args) -> None:
    import diffusers
    import jax
    import numpy as np
    import torch
    from flax import nnx

    from jax_mmdit.vae import VAE_PRESETS, AutoencoderKL, load_vae, save_vae
    from jax_mmdit.vae.codec import VaeRunner

    cfg = VAE_PRESETS["sd"] if args.vae == "sd" else _small()
    with tempfile.TemporaryDirectory() as tmp:
        save_vae(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), cfg, Path(tmp) / "vae")
        model, _ = load_vae(Path(tmp) / "vae")
        ref = diffusers.AutoencoderKL.from_pretrained(Path(tmp) / "vae").eval()
    runner = VaeRunner(model, args.batch, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (args.batch, args.resolution, args.resolution, cfg.in_channels), np.uint8)
    f = cfg.downsample_factor
    z = rng.standard_normal((args.batch, args.resolution // f, args.resolution // f, cfg.latent_channels), np.float32)
    x_t = torch.from_numpy(u8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    z_t = torch.from_numpy(z.transpose(0, 3, 1, 2).copy())
    torch.set_num_threads(os.cpu_count())
    cases = {
        "encode": (lambda: runner.encode(u8), lambda: ref.encode(x_t).latent_dist.mean),
        "decode": (lambda: runner.decode(z), lambda: ref.decode(z_t).sample),
    }
    print(
        f"| VAE {args.vae} at {args.resolution}², batch {args.batch} | ours img/s | diffusers (torch) img/s | ratio |"
    )
    print("|---|---|---|---|")
    for name, (ours, theirs) in cases.items():
        ours()  # compile
        times = {"ours": [], "torch": []}
        with torch.no_grad():
            theirs()
            for _ in range(args.rounds):  # alternated, so noise hits both alike
                for key, fn in (("ours", ours), ("torch", theirs)):
                    t = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t)
        a, b = (args.batch / sorted(times[k])[len(times[k]) // 2] for k in ("ours", "torch"))
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |", flush=True)


def memory_worker(latent_dir: str, batches: int) -> None:
    from benchmarks.workers import peak_rss_bytes, rss_bytes
    from jax_mmdit.data import DataConfig, build_dataset

    base = rss_bytes()  # after the imports; VmHWM, unlike ru_maxrss, does not survive exec
    ds = build_dataset(DataConfig(name="imagenet", source=latent_dir), "train")
    it = ds.iterator(64, seed=0)
    for _ in range(batches):
        next(it)
    it.close()
    print(json.dumps({"n": ds.info.num_examples, "base_mib": base / 2**20, "peak_mib": peak_rss_bytes() / 2**20}))


def _encode_synthetic(tmp: Path, n: int) -> Path:
    import numpy as np
    from flax import nnx

    from jax_mmdit.vae import AutoencoderKL, VAEConfig, save_vae
    from jax_mmdit.vae.encode import cmd_encode

    vae = tmp / "vae"
    if not vae.exists():
        cfg = VAEConfig(block_out_channels=(4, 4), layers_per_block=1, norm_num_groups=2)
        save_vae(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), cfg, vae)
    images = np.random.default_rng(n).integers(0, 256, (n, 64, 64, 3), np.uint8)
    np.savez(tmp / f"images{n}.npz", images=images, labels=np.arange(n) % 1000)
    out = tmp / f"latents{n}"
    cmd_encode(["--vae", str(vae), "--out", str(out), "--dataset", "imagenet", "--source", str(tmp / f"images{n}.npz"),
                "--resolution", "64", "--batch_size", "256", "--shard_size", "2048"])  # fmt: skip
    (tmp / f"images{n}.npz").unlink()
    return out


def memory(args) -> None:
    print("| latent directory | examples read | on disk MiB | peak RSS MiB | RSS after imports MiB | peak vs N |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for n in (args.examples, 10 * args.examples):
            out = _encode_synthetic(Path(tmp), n)
            disk = sum(f.stat().st_size for f in out.iterdir()) / 2**20
            r = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_latents", "--memory_worker", str(out)],
                capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            )  # fmt: skip
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                print(f"| {n} | error: {r.stderr[-300:]} |")
                continue
            m = json.loads(lines[-1])
            base = base or m["peak_mib"]
            print(f"| {n} 32x32x4 x2 float32 | {m['n']} | {disk:.0f} | {m['peak_mib']:.0f} | {m['base_mib']:.0f} | "
                  f"{m['peak_mib'] / base:.2f}x |", flush=True)  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["speed", "memory"], default=None)
    p.add_argument("--vae", choices=["sd", "small"], default="small")
    p.add_argument("--resolution", type=int, default=None, help="default: 256 for sd, 32 for small")
    p.add_argument("--batch", type=int, default=None, help="default: 4 for sd, 256 for small")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--examples", type=int, default=1000, help="N of the memory table")
    p.add_argument("--memory_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker, batches=100)
        return 0
    args.resolution = args.resolution or (256 if args.vae == "sd" else 32)
    args.batch = args.batch or (4 if args.vae == "sd" else 256)
    if args.only in (None, "speed"):
        speed(args)
    if args.only in (None, "memory"):
        memory(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
