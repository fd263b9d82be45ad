"""Training-step benchmark: jax_mmdit's DiT and MMDiT against diffusers' PyTorch DiT and SD3
MMDiT (`DiTTransformer2DModel`, `SD3Transformer2DModel`), in one invocation.

    python -m benchmarks.bench_train            # CPU table (~45 min on 2 cores)
    python -m benchmarks.bench_train --quick    # tiny shapes, CI smoke (< 2 min)
    python -m benchmarks.bench_train --gpu      # DiT-B/2, DiT-XL/2 bf16 on a GPU, MFU vs the card's peak

Every implementation runs in its own worker process (benchmarks/workers.py), so one's memory or
thread pools cannot affect another's numbers. The workers of one config are all started (and
compiled) first, then the orchestrator alternates timed segments between them for several
rounds, rotating the order, and takes per-implementation medians: noise from other jobs on the
machine then lands on all rows alike and the ratios stay meaningful.

FLOPs come from XLA's cost analysis of our compiled fp32 step; the same count is used for every
row of a config (same model maths), so GFLOP/s compare like for like. The sgemm peak is numpy's
fp32 matmul measured in the same invocation (before and after; the larger is quoted).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.workers import PREFIX, cpu_name

REPO = Path(__file__).resolve().parent.parent
# PyTorch's intra-op threads: one per core of the 2-core machine the reference numbers come from
# (XLA:CPU also uses one thread per core by default). Overridable with --torch-threads.
TORCH_THREADS = 2
GIB = 2.0**30


@dataclass
class Impl:
    label: str
    spec: dict  # merged into the config's spec
    reference: bool = False  # the row ratios are computed against (PyTorch eager fp32)


@dataclass
class Group:
    name: str
    spec: dict  # kind-independent: base preset, model overrides, batch
    impls: list[Impl]
    extras: list[Impl] = field(default_factory=list)  # sampling / data loading, not train rows


# ---- workers -------------------------------------------------------------------------------------
def worker_env(spec: dict, args, cache_dir: Path) -> dict:
    """The worker's environment: the same malloc for every row (--allocator), the row's own
    variables (`env` in its spec), and a compilation cache of its own,
    so a restarted worker loads its program instead of compiling it again."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_COMPILATION_CACHE_DIR": str(cache_dir), **spec.get("env", {})}
    if args.allocator == "jemalloc":
        from jax_mmdit import runtime

        env = runtime.jemalloc_env(env, runtime.find_jemalloc())
    return env


class Worker:
    """One implementation's worker process. It can be stopped while idle (to give all its memory
    back) and is started again, from its compilation cache, when it is next asked to run."""

    def __init__(self, label: str, spec: dict, args):
        self.label = label
        self.spec = spec
        self.args = args
        name = label.replace(" ", "_").replace("/", "-")
        self.log = args.log_dir / (name + ".log")
        self.cache_dir = args.log_dir / "jax-cache" / name
        self.info: dict = {}
        self.step_seconds: list[float] = []
        self.restarts = 0
        self.rss = 0.0  # resident bytes when it last went idle (0 while stopped)
        self.peak = 0.0  # largest resident bytes seen, compilation and warm-up included
        self.timed_peak = 0.0  # largest resident bytes over the timed steps only (the table's)
        self.proc = None

    def start(self) -> dict:
        """Start the process and wait until it has compiled and warmed up; returns its ready line."""
        err = None if self.args.verbose else open(self.log, "a")
        # A restart warms up as many steps as the first start: a fresh heap takes a few steps to
        # reach its steady state, and every row should be timed in the same state.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.workers", json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
            env=worker_env(self.spec, self.args, self.cache_dir),
        )
        ready = self.read()
        self.rss = ready.get("idle_rss") or 0.0
        self.peak = max(self.peak, ready.get("warmup_peak_rss") or 0.0)
        return ready

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
        rc = self.proc.wait()
        tail = self.log.read_text()[-1500:] if self.log.exists() else ""
        return {"error": f"worker exited with code {rc}", "log_tail": tail}

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def run(self, n: int) -> None:
        if "error" in self.info:
            return
        if not self.running:
            print(f"  [{self.label}] restarting (stopped to make room)", file=sys.stderr, flush=True)
            ready = self.start()
            self.restarts += 1
            if "error" in ready:
                self.info["error"] = f"restart failed: {ready['error']}"
                return
        try:
            self.send({"op": "run", "n": n})
        except (BrokenPipeError, OSError):  # died (e.g. the OOM killer): report it, time the rest
            self.info["error"] = f"worker died (exit code {self.proc.wait()})"
            return
        r = self.read()
        if "seconds" in r:
            self.step_seconds.append(r["seconds"] / r["n"])
            self.rss = r.get("rss") or 0.0
            self._saw_peak(r)
        else:
            self.info.setdefault("error", r.get("error", "no result"))

    def quit(self) -> None:
        if self.running:
            try:
                self.send({"op": "quit"})
                self._saw_peak(self.read())
            except (BrokenPipeError, OSError):
                pass
        if self.proc is not None:
            self.proc.wait()
        self.rss = 0.0

    def _saw_peak(self, r: dict) -> None:
        self.timed_peak = max(self.timed_peak, r.get("peak_rss") or 0.0)
        self.peak = max(self.peak, self.timed_peak)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None


def start(label: str, spec: dict, args) -> Worker:
    """Start a worker and wait until it has compiled and warmed up (one at a time: compiles must
    not compete with each other, and only one process should hold activation memory)."""
    w = Worker(label, spec, args)
    w.info = w.start()
    status = f"error: {w.info['error']}" if "error" in w.info else f"ready ({w.info.get('warm_step_s', 0):.3g} s/step)"
    print(f"  [{label}] {status}", file=sys.stderr, flush=True)
    return w


def start_with_fallback(label: str, spec: dict, args) -> Worker:
    """On a GPU, halve the batch until the step fits (the brief: 256 or the largest that fits)."""
    w = start(label, spec, args)
    while w.info.get("oom") and spec["batch"] > 1:
        w.quit()
        spec = {**spec, "batch": spec["batch"] // 2}
        w = start(f"{label} b{spec['batch']}", spec, args)
    return w


def _mem_available() -> float:
    with open("/proc/meminfo") as f:
        return next(float(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def make_room(need: float, idle: list[Worker]) -> None:
    """Stop idle workers (largest first) until `need` bytes are available. Only when needed: a
    stopped worker pays a restart (loading its cached program, warm-up steps) before its next
    segment, and small configs never stop."""
    for other in sorted((o for o in idle if o.running), key=lambda o: -o.rss):
        if _mem_available() >= need:
            return
        other.quit()


def step_need(w: Worker) -> float:
    """Bytes `w` needs free before its next segment, with a margin."""
    return max(w.peak - w.rss, w.info.get("xla_plan") or 0.0, 2 * GIB) + 1.5 * GIB


def measure_group(g: Group, args) -> list[Worker]:
    print(f"[{g.name}] starting workers", file=sys.stderr, flush=True)
    workers = []
    for impl in g.impls + g.extras:
        spec = {**g.spec, **impl.spec}
        if "model" in impl.spec:  # a row's model overrides add to the config's
            spec["model"] = {**g.spec.get("model", {}), **impl.spec["model"]}
        # A new worker is assumed to need as much as the largest one started so far.
        make_room(max((w.peak for w in workers), default=0.0) + 1.5 * GIB, workers)
        w = start_with_fallback(impl.label, spec, args) if args.gpu else start(impl.label, spec, args)
        w.impl = impl
        workers.append(w)
    live = [w for w in workers if "error" not in w.info]
    for r in range(args.rounds):
        # Rotate the order each round: no implementation always runs right after another.
        k = r % max(len(live), 1)
        for w in live[k:] + live[:k]:
            n = max(1, round(args.segment_s / max(w.info["warm_step_s"], 1e-6)))
            make_room(step_need(w), [o for o in live if o is not w])
            w.run(n)
        print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for w in workers:
        w.quit()
    return workers


def matmul_peak(args) -> dict:
    spec = {"kind": "matmul_peak", "threads": args.torch_threads}
    if args.quick:
        spec.update(sizes=[1024, 2048], reps=3)
    w = Worker("matmul_peak", spec, args)
    r = w.start()
    w.proc.wait()
    return r.get("result", {})


# ---- cases ---------------------------------------------------------------------------------------
def train_impls(args) -> list[Impl]:
    if args.gpu:
        impls = [Impl("jax bf16", {"kind": "jax_train", "precision": "bf16"})]
        if args.with_fp32:
            impls.append(Impl("jax fp32", {"kind": "jax_train", "precision": "fp32"}))
        if not args.no_torch and _torch_cuda():
            impls.append(Impl("torch bf16 autocast", {"kind": "torch_train", "precision": "bf16", "cuda": True}))
        return impls
    t = {"kind": "torch_train", "threads": args.torch_threads, "keep_denormals": args.torch_denormals}
    impls = [Impl(f"jax {p}", {"kind": "jax_train", "precision": p}) for p in args.precisions]
    for variant in args.jax_variant:
        label, flags = variant.split(":", 1)
        for prec in args.precisions:
            impls.append(Impl(f"jax {prec} {label}", {"kind": "jax_train", "precision": prec, "xla_flags": flags}))
    if args.xla_dots:  # the same step on XLA's own ops (kernels="xla"), not the package's kernels
        for prec in args.precisions:
            impls.append(Impl(f"jax {prec} xla-dots", {"kind": "jax_train", "precision": prec, "kernels": "xla"}))
    if args.attention_xla:  # attention as separate matmuls + XLA softmax, not the fused kernel
        for prec in args.precisions:
            impls.append(
                Impl(f"jax {prec} attention=xla", {"kind": "jax_train", "precision": prec, "attention": "xla"})
            )
    if args.accum > 1:  # same maths, activations of batch/accum at a time
        for prec in args.precisions:
            impls.append(
                Impl(f"jax {prec} accum{args.accum}", {"kind": "jax_train", "precision": prec, "accum": args.accum})
            )
    if args.ref_src:
        for prec in args.precisions:
            impls.append(Impl(f"jax {prec} @ref", {"kind": "jax_train", "precision": prec, "src": str(args.ref_src)}))
    if not args.no_torch and _has("torch") and _has("diffusers"):
        impls += [
            Impl("torch eager fp32", {**t, "precision": "fp32"}, reference=True),
            Impl("torch eager bf16 autocast", {**t, "precision": "bf16"}),
        ]
        if args.torch_compile:
            impls += [
                Impl("torch.compile fp32", {**t, "precision": "fp32", "compile": True}),
                Impl("torch.compile bf16 autocast", {**t, "precision": "bf16", "compile": True}),
            ]
    return impls


_S2 = {"image_size": 32, "in_channels": 3, "num_classes": 10}
# The CPU configs: key -> (table name, worker spec).
CPU_CASES = {
    "s2-b32": ("DiT-S/2 32x32x3 b32", {"preset": "DiT-S/2", "model": _S2, "batch": 32}),
    "s2-b128": ("DiT-S/2 32x32x3 b128", {"preset": "DiT-S/2", "model": _S2, "batch": 128}),
    # The DiT of the fashion_mnist preset's size (192 wide, 6 deep, patch 4; the default was this DiT
    # until the recipe ablation moved it to MMDiT, docs/recipe.md).
    "default": (
        "DiT 192x6 patch 4, 28x28x1 b128",
        {"base": "fashion_mnist", "model": {"arch": "dit", "qk_norm": False}, "batch": 128},
    ),
    # 256 image tokens + 4 learned class tokens per image (our MMDiT's class conditioning; the
    # torch rows feed the same tokens to SD3Transformer2DModel, workers.torch_mmdit).
    "mmdit-s2-b32": ("MMDiT-S/2 32x32x3 b32", {"preset": "MMDiT-S/2", "model": _S2, "batch": 32}),
}


def groups(args) -> list[Group]:
    impls = train_impls(args)
    default_extras = [
        Impl("sampling 50 Euler + CFG", {"kind": "jax_sample", "batch": 8 if args.quick else 64, "steps": 50}),
        Impl("data loader", {"kind": "data_loader"}),
    ]
    if args.gpu:
        latents = {"image_size": 32, "in_channels": 4, "num_classes": 1000}
        return [
            Group(f"{p} 32x32x4 b{args.gpu_batch}", {"preset": p, "model": latents, "batch": args.gpu_batch}, impls)
            for p in args.gpu_models
        ]
    if args.quick:
        tiny = {"image_size": 16, "in_channels": 3, "hidden_size": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
        return [Group("tiny DiT 16x16x3 b8", {"model": tiny, "batch": 8}, impls, default_extras)]
    return [
        Group(CPU_CASES[k][0], CPU_CASES[k][1], impls, default_extras if k == "default" else [])
        for k in (args.only or CPU_CASES)
    ]


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def _torch_cuda() -> bool:
    if not _has("torch"):
        return False
    import torch

    return torch.cuda.is_available()


# ---- report --------------------------------------------------------------------------------------
def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def report(results: list[tuple[Group, list[Worker]]], peaks: list[dict], args) -> str:
    peak = max((p.get("numpy_fp32", 0.0) for p in peaks), default=0.0) * 1e9 or None
    lines = []
    host = f"{cpu_name()}, {os.cpu_count()} cores"
    devices = sorted({w.info["device"] for _, ws in results for w in ws if w.info.get("device")})
    lines.append(
        f"# bench_train {datetime.date.today()} on {host} "
        f"({'quick' if args.quick else 'gpu' if args.gpu else 'full'}); "
        f"devices: {', '.join(devices) or '-'}; malloc: {args.allocator}"
    )
    kernel_rows = sorted({w.label for _, ws in results for w in ws if w.info.get("kernels")})
    jax_rows = {w.label for _, ws in results for w in ws if w.spec.get("kind") == "jax_train"}
    line = "jax rows on the package's C++/oneDNN kernels (jax_mmdit.ops.onednn): " + (", ".join(kernel_rows) or "none")
    if jax_rows - set(kernel_rows):
        line += "; on XLA's own ops: " + ", ".join(sorted(jax_rows - set(kernel_rows)))
    lines.append(line)
    if peaks:
        lines.append(
            "matmul GFLOP/s (best size, median): "
            + "; ".join(f"run {i + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in p.items()) for i, p in enumerate(peaks))
        )
    head = (
        "| config | impl | img/s | vs torch fp32 | GFLOP/s | % sgemm peak | MFU | XLA plan GiB | peak RSS GiB "
        "| compile s |"
    )
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for g, workers in results:
        train = [w for w in workers if w.impl in g.impls]
        # One FLOP count per image for every row of a config: the jax fp32 step's (same model maths).
        counted = [w for w in train if w.info.get("flops")]
        counted.sort(key=lambda w: w.spec.get("precision") != "fp32")
        flops_per_img = counted[0].info["flops"] / counted[0].info["batch"] if counted else None
        ref = next((w for w in train if w.impl.reference and w.median_s), None)
        for w in train:
            if "error" in w.info:
                lines.append(f"| {g.name} | {w.label} | error: {w.info['error'][:80]} | | | | | | | |")
                continue
            s, b = w.median_s, w.info.get("batch", g.spec["batch"])
            f = flops_per_img * b if flops_per_img else None
            gfs = f / s / 1e9 if f and s else None
            mfu = f / s / w.info["peak_flops"] * 100 if f and s and w.info.get("peak_flops") else None
            lines.append(
                f"| {g.name}{'' if b == g.spec['batch'] else f' (b{b})'} | {w.label} | "
                f"{_fmt(b / s if s else None, '.2f')} | "
                f"{_fmt(ref.median_s / s if ref and s else None, '.2f')} | {_fmt(gfs, '.0f')} | "
                f"{_fmt(gfs * 1e9 / peak * 100 if gfs and peak else None, '.0f')} | {_fmt(mfu, '.1f')} | "
                f"{_fmt(w.info['xla_plan'] / GIB if w.info.get('xla_plan') else None, '.2f')} | "
                f"{_fmt(w.timed_peak / GIB if w.timed_peak else None, '.2f')} | "
                f"{_fmt(w.info.get('compile_s') if w.spec['kind'] == 'jax_train' else None, '.0f')} |"
            )
        extras = [w for w in workers if w.impl in g.extras]
        best_train = max(
            (
                w.info.get("batch", 0) / w.median_s
                for w in train
                if w.median_s and w.impl.spec.get("kind") == "jax_train"
            ),
            default=None,
        )
        for w in extras:
            if "error" in w.info or not w.median_s:
                lines.append(f"\n{g.name} {w.label}: error: {w.info.get('error', 'no timing')[:200]}")
                continue
            rate = w.info["batch"] / w.median_s
            if w.spec["kind"] == "jax_sample":
                lines.append(
                    f"\n{g.name} sampling: {rate:.1f} img/s ({w.info['steps']} Euler steps, CFG {w.info['cfg_scale']} "
                    f"= {2 * w.info['steps']} model evals/img; batch {w.info['batch']}, {w.median_s:.2f} s/batch)"
                )
            else:
                ratio = (
                    f", {rate / best_train:.0f}x the fastest JAX train step ({best_train:.1f} img/s)"
                    if best_train
                    else ""
                )
                lines.append(f"{g.name} data loader: {rate:.0f} img/s (batch {w.info['batch']}){ratio}")
    restarted = [f"{w.label} ({g.name}) x{w.restarts}" for g, ws in results for w in ws if w.restarts]
    if restarted:
        lines.append("\nStopped while idle to make room, restarted from the compilation cache: " + ", ".join(restarted))
    lines.append(
        f"\nMedians of {args.rounds} alternating rounds of ~{args.segment_s:g} s segments per row; torch threads "
        f"{args.torch_threads}; FLOPs per config from XLA cost analysis of the jax fp32 step; "
        f"% sgemm peak against numpy fp32 {_fmt(peak / 1e9 if peak else None, '.0f')} GFLOP/s; "
        "XLA plan = arguments + outputs + temporaries - aliased; peak RSS over the timed steps only."
    )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few iterations (CI smoke, < 2 min)")
    p.add_argument("--gpu", action="store_true", help="DiT-B/2 and DiT-XL/2, 32x32x4 latents, bf16, MFU")
    p.add_argument("--gpu-batch", type=int, default=256, help="GPU batch; halved until it fits")
    p.add_argument("--gpu-models", nargs="+", default=["DiT-B/2", "DiT-XL/2"], help="GPU: model presets")
    p.add_argument("--with-fp32", action="store_true", help="GPU: also time the fp32 step")
    p.add_argument("--only", nargs="*", choices=list(CPU_CASES), help="CPU config subset")
    p.add_argument("--rounds", type=int, default=None, help="alternating timing rounds (default 3, quick 2)")
    p.add_argument("--segment-s", type=float, default=None, help="target seconds per timed segment")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16", "fp16"],
        help="CPU: precisions of the jax rows",
    )
    p.add_argument(
        "--accum",
        type=int,
        default=1,
        help="also time jax rows with this many gradient-accumulation micro-batches per step (grad_accum_steps)",
    )
    p.add_argument("--torch-threads", type=int, default=TORCH_THREADS)
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile rows")
    p.add_argument(
        "--torch-denormals",
        action="store_true",
        help="leave PyTorch's denormals on (its default; XLA flushes them): much slower fp32",
    )
    p.add_argument("--no-torch", action="store_true")
    p.add_argument(
        "--jax-variant",
        action="append",
        default=[],
        metavar="LABEL:XLA_FLAGS",
        help="extra jax rows (one per precision) with these XLA_FLAGS added (for experiments)",
    )
    p.add_argument(
        "--ref-src",
        type=Path,
        help="a directory holding another jax_mmdit package (e.g. "
        "`git archive HEAD jax_mmdit | tar -x -C DIR`): adds its jax rows, timed alongside",
    )
    p.add_argument("--json", type=Path, help="also write raw results here")
    p.add_argument(
        "--xla-dots", action="store_true", help="also time jax rows with --kernels xla (XLA's own ops), alongside"
    )
    p.add_argument(
        "--attention-xla",
        action="store_true",
        help="also time jax rows with attention='xla' (no fused attention kernel), alongside",
    )
    p.add_argument(
        "--allocator",
        choices=["jemalloc", "system"],
        default=None,
        help="malloc of every worker, jax and torch alike (default: jemalloc where installed, "
        "as `mmdit` runs on CPU; bench_allocator compares the two)",
    )
    p.add_argument("--verbose", action="store_true", help="show workers' stderr")
    args = p.parse_args(argv)
    if args.allocator is None:
        from jax_mmdit import runtime

        args.allocator = "jemalloc" if runtime.find_jemalloc() and not args.gpu else "system"
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.segment_s = args.segment_s or (0.5 if args.quick else 6.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        args.log_dir = Path(tmp)
        peaks = [] if args.gpu else [matmul_peak(args)]
        results = [(g, measure_group(g, args)) for g in groups(args)]
        if not args.gpu:
            peaks.append(matmul_peak(args))
        text = report(results, peaks, args)
    print(text)
    if args.json:
        raw = {
            "peaks": peaks,
            "groups": [
                {
                    "name": g.name,
                    "spec": g.spec,
                    "rows": [
                        {"label": w.label, "spec": w.spec, "info": w.info, "step_seconds": w.step_seconds} for w in ws
                    ],
                }
                for g, ws in results
            ],
        }
        args.json.write_text(json.dumps(raw, indent=1))
    errors = [w.label for _, ws in results for w in ws if "error" in w.info]
    return 1 if errors and args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
