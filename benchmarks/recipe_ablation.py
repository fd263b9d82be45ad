"""The default recipe's ablation: one change at a time, each trained and judged the same way.

Each variant is the default config (`--config fashion_mnist`) plus a few command-line overrides,
trained for the default budget (the preset's 702 steps) in its own run directory and scored by the
run's own classifier evaluator at the end (1000 samples, 100 per class). Sampler variants re-score one
trained run with `mmdit eval` instead of training again. Results accumulate in a JSON-lines file,
so a long ablation can be run a few variants at a time; the table covers every row in it.

    python benchmarks/recipe_ablation.py --variants baseline dit --out runs/ablation
    python benchmarks/recipe_ablation.py --on fp32_1epoch --variants lr2e-3 b2_0.99 --out runs/ablation
    python benchmarks/recipe_ablation.py --sampler cfg3 --from baseline --out runs/ablation
    python benchmarks/recipe_ablation.py --table --out runs/ablation

Wall time is the whole `mmdit train` command (start-up, compilation, the evaluations it runs),
what a user waits for; the machine is noisy, so the baseline is re-run in the same session.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import time

# Training variants: overrides of the default config. One change each, unless named as a combination.
TRAIN_VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "seed1": ["--seed", "1"],
    # Architecture: the default is SD3's two-stream MMDiT (the class as 4 learned context tokens in
    # joint attention) with QK-norm; "dit" is the former default, DiT at the same width and depth.
    "dit": ["--model.arch", "dit", "--model.no_qk_norm"],
    "no_qk_norm": ["--model.no_qk_norm"],
    "swiglu": ["--model.mlp", "swiglu"],
    "conv_stem": ["--model.stem", "conv"],
    "learned_pos": ["--model.pos_embed", "learned"],
    # Patch 2 (196 tokens) at half the width: about the same matmul FLOPs per image as patch 4.
    "patch2_w96": ["--model.patch_size", "2", "--model.hidden_size", "96"],
    # Optimiser.
    "lr2e-3": ["--optim.learning_rate", "2e-3"],
    "lr5e-4": ["--optim.learning_rate", "5e-4"],
    "b2_0.99": ["--optim.b2", "0.99"],
    "cosine": ["--optim.schedule", "cosine"],
    "batch64": ["--batch_size", "64"],
    "no_ema": ["--optim.ema_decay", "0"],
    # With EMA warmup the decay is (1+step)/(10+step) < 0.99 for the whole epoch, so ema_decay
    # only matters without it.
    "ema0.99": ["--optim.ema_decay", "0.99"],
    "ema0.99_no_warmup": ["--optim.ema_decay", "0.99", "--optim.no_ema_warmup"],
    # Flow.
    "uniform_t": ["--flow.timestep_sampling", "uniform"],
    "logit_mean0.5": ["--flow.logit_mean", "0.5"],
    "label_dropout0.2": ["--flow.label_dropout", "0.2"],
    # Precision and budget: the default computes in bf16 for 1.5 epochs; the rows before it were
    # measured on the former default, one epoch in fp32.
    "fp32_1epoch": ["--precision", "fp32", "--n_epochs", "1"],
    "bf16_1epoch": ["--n_epochs", "1"],
}

# Sampler variants: `mmdit eval` options on a trained variant's final checkpoint.
SAMPLER_VARIANTS: dict[str, list[str]] = {
    "cfg1.5": ["--cfg", "1.5"],
    "cfg3": ["--cfg", "3"],
    "cfg4": ["--cfg", "4"],
    "cfg4_interval": ["--cfg", "4", "--cfg_interval", "0", "0.7"],
    "cfg3_interval": ["--cfg", "3", "--cfg_interval", "0", "0.7"],
    "heun16": ["--method", "heun", "--steps", "16"],
    "euler64": ["--steps", "64"],
    "euler16": ["--steps", "16"],
}

# Every variant judges the end of training; intermediate grids and checkpoints cost time alike.
COMMON = ["--config", "fashion_mnist", "--sample_every_n", "0", "--eval_save_steps", "468"]


def _mmdit() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "mmdit")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "jax_mmdit.cli"]


def _train_result(log_path: str) -> dict:
    """The scores of the run's final evaluation, from its console lines ("done at step N: {...}" and
    the evaluator's "classifier_fd X (real Y)")."""
    text = open(log_path, errors="replace").read().replace("\r", "\n")
    done = re.findall(r"\[mmdit\] done at step (\d+): (\{.*?\})", text)
    floors = re.findall(r"classifier_fd [\d.]+ \(real ([\d.]+)\)", text)
    if not done or not floors:
        raise SystemExit(f"no final evaluation in {log_path}")
    scores = ast.literal_eval(done[-1][1])
    scores["eval/classifier_fd_real"] = float(floors[-1])
    return {"scores": scores, "protocol": {"checkpoint_step": int(done[-1][0])}}


def _row(name: str, kind: str, wall_s: float, result: dict, overrides: list[str]) -> dict:
    scores = result["scores"]
    by_class = result.get("class_accuracy_by_class", {})
    return {
        "variant": name,
        "kind": kind,
        "overrides": " ".join(overrides),
        "wall_s": round(wall_s, 1),
        "class_accuracy": scores["eval/class_accuracy"],
        "class_accuracy_min": scores.get("eval/class_accuracy_min"),
        "worst_class": min(by_class, key=by_class.get) if by_class else None,
        "classifier_fd": round(scores["eval/classifier_fd"], 2),
        "fd_real": round(scores["eval/classifier_fd_real"], 2),
        "step": result["protocol"]["checkpoint_step"],
    }


def _append(out: str, row: dict) -> None:
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def train_variant(name: str, out: str, on: str | None) -> None:
    overrides = (TRAIN_VARIANTS[on] if on else []) + TRAIN_VARIANTS[name]
    name = f"{on}+{name}" if on else name
    run_dir = os.path.join(out, name)
    if os.path.exists(run_dir):
        raise SystemExit(f"{run_dir} exists: remove it to re-run {name!r} (a run there would resume).")
    cmd = _mmdit() + ["train", *COMMON, "--run_dir", run_dir, *overrides]
    t0 = time.perf_counter()
    log_path = os.path.join(out, f"{name}.log")
    with open(log_path, "w") as log:  # no progress bars in the log: its console lines are parsed
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    _append(out, _row(name, "train", time.perf_counter() - t0, _train_result(log_path), overrides))


def sampler_variant(name: str, source: str, out: str) -> None:
    run_dir = os.path.join(out, source)
    tag = f"{source}+{name}"
    samples = os.path.join(out, "sampler", f"{tag}.npz")
    result = os.path.join(out, "sampler", f"{tag}.json")
    os.makedirs(os.path.dirname(samples), exist_ok=True)
    cmd = _mmdit() + ["eval", "--run", run_dir, "--metric", "classifier", "--samples", samples, "--out", result]
    t0 = time.perf_counter()
    with open(os.path.join(out, f"{tag}.log"), "w") as log:
        subprocess.run(cmd + SAMPLER_VARIANTS[name], stdout=log, stderr=subprocess.STDOUT, check=True)
    _append(out, _row(tag, "sample", time.perf_counter() - t0, json.load(open(result)), SAMPLER_VARIANTS[name]))


def table(out: str) -> None:
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    print("| variant | change | wall s | class acc | worst class | classifier FD (floor) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        worst = f"{r['class_accuracy_min']:.2f} {r['worst_class'] or ''}".strip()
        print(
            f"| {r['variant']} | `{r['overrides'] or '-'}` | {r['wall_s']:.0f} | {r['class_accuracy']:.3f} | "
            f"{worst} | {r['classifier_fd']:.1f} ({r['fd_real']:.1f}) |"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ablation", help="run directories, logs and results.jsonl")
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(TRAIN_VARIANTS))
    p.add_argument("--sampler", nargs="*", default=[], choices=sorted(SAMPLER_VARIANTS))
    p.add_argument("--from", dest="source", default="baseline", help="the trained variant --sampler re-scores")
    p.add_argument("--on", default=None, choices=sorted(TRAIN_VARIANTS), help="a variant the others are added to")
    p.add_argument("--table", action="store_true", help="print the table of every result so far")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.variants:
        train_variant(name, args.out, args.on)
    for name in args.sampler:
        sampler_variant(name, args.source, args.out)
    if args.table or args.variants or args.sampler:
        table(args.out)


if __name__ == "__main__":
    main()
