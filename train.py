"""Train with the original project's flags (a thin wrapper over `mmdit train`).

    python train.py --n_epochs 1 --batch_size 128 --learning_rate 1e-3 --dataset_name fashion_mnist \
        --eval_save_steps 200 --n_eval_batches 10 --sample_every_n 200 [--profile] [--half_precision]

Any `mmdit train` override can follow, e.g. `--model.depth 8 --mesh.fsdp 2`.
"""

import argparse
import sys

from jax_mmdit import cli


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_epochs", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=None)
    p.add_argument("--eval_save_steps", type=int, default=None, help="steps between eval loss + checkpoint")
    p.add_argument("--n_eval_batches", type=int, default=None)
    p.add_argument("--sample_every_n", type=int, default=None, help="steps between sample grids/GIFs")
    p.add_argument("--dataset_name", default="fashion_mnist")
    p.add_argument("--profile", action="store_true", help="profile a few steps and exit")
    p.add_argument("--half_precision", action="store_true", help="bf16 compute (same as --precision bf16)")
    args, rest = p.parse_known_args(argv)
    out = ["--config", args.dataset_name]
    for name in ("n_epochs", "batch_size", "eval_save_steps", "n_eval_batches", "sample_every_n"):
        if getattr(args, name) is not None:
            out += [f"--{name}", str(getattr(args, name))]
    if args.learning_rate is not None:
        out += ["--optim.learning_rate", str(args.learning_rate)]
    if args.profile:
        out += ["--profile"]
    # The original script computed in fp32 unless --half_precision (the preset's default is bf16).
    if args.half_precision:
        out += ["--precision", "bf16"]
    elif "--precision" not in rest:
        out += ["--precision", "fp32"]
    return cli.main(["train", *out, *rest])


if __name__ == "__main__":
    from jax_mmdit import runtime

    runtime.use_jemalloc()
    sys.exit(main())
