"""glibc malloc against jemalloc (what `mmdit` preloads on CPU) for our training step.

    python -m benchmarks.bench_allocator                      # DiT-S/2 b32 and the default config
    python -m benchmarks.bench_allocator --only s2-b128 --steps 2

Each run is a fresh process (the allocator is fixed at process start, `runtime.use_jemalloc`),
system and jemalloc processes alternate, one warm step is untimed; per step we report the median
seconds, minor page faults and kernel time, and the process's peak RSS (compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchmarks.bench_train import CPU_CASES, REPO
from benchmarks.workers import _synthetic_batch, peak_rss_bytes, train_config

ALLOCATORS = ("system", "jemalloc")


def worker(spec: dict) -> None:
    from jax_mmdit import runtime

    runtime.use_jemalloc()  # re-executes this process under jemalloc unless MMDIT_ALLOCATOR=system
    runtime.configure()
    import jax

    from jax_mmdit.train.trainer import Trainer

    cfg = train_config(spec)
    tr = Trainer(cfg, devices=jax.devices()[:1], with_data=False)
    x, y = _synthetic_batch(tr.model_cfg, cfg.batch_size)
    batch = {"image": x, "label": y}
    jax.block_until_ready(tr.train_step(batch)["loss"])  # compile + first touch of the heap
    secs, faults, sys_s = [], [], []
    for _ in range(spec["steps"]):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.block_until_ready(tr.train_step(batch)["loss"])
        t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        secs.append(t)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        sys_s.append(r1.ru_stime - r0.ru_stime)
    jemalloc = any("jemalloc" in line for line in open("/proc/self/maps"))
    print(json.dumps({"s": statistics.median(secs), "faults": statistics.median(faults), "sys_s": statistics.median(sys_s),
                      "peak_gib": (peak_rss_bytes() or 0) / 2**30, "jemalloc": jemalloc, "batch": cfg.batch_size}))


def run(spec: dict, allocator: str) -> dict:
    env = {**os.environ, "MMDIT_ALLOCATOR": allocator, "PYTHONPATH": str(REPO)}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_allocator", "--worker", json.dumps(spec)],
                         env=env, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"exit {out.returncode}: {out.stderr[-300:]}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(CPU_CASES), default=["s2-b32", "default"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=1, help="system/jemalloc process pairs per config")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    print("| config | allocator | s/step | img/s | vs system | faults/step | kernel s/step | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for key in args.only:
        name, spec = CPU_CASES[key]
        spec = {**spec, "precision": args.precision, "steps": args.steps}
        res = {a: [] for a in ALLOCATORS}
        for r in range(args.rounds):
            for a in ALLOCATORS if r % 2 == 0 else ALLOCATORS[::-1]:
                res[a].append(run(spec, a))
        base = None
        for a in ALLOCATORS:
            ok = [x for x in res[a] if "error" not in x]
            if not ok:
                print(f"| {name} {args.precision} | {a} | error: {res[a][-1]['error'][:120]} | | | | | |")
                continue
            s = statistics.median(x["s"] for x in ok)
            base = base or s
            label = a if a == "system" or all(x["jemalloc"] for x in ok) else f"{a} (not loaded)"
            print(f"| {name} {args.precision} | {label} | {s:.3f} | {ok[0]['batch'] / s:.1f} | {base / s:.2f}x | "
                  f"{statistics.median(x['faults'] for x in ok):.0f} | {statistics.median(x['sys_s'] for x in ok):.2f} | "
                  f"{max(x['peak_gib'] for x in ok):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
