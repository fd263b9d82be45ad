"""glibc malloc against jemalloc (what `mmdit` preloads on CPU) for our training step, or
(`--compare dispatch`) JAX's asynchronous CPU dispatch against the inline dispatch
`runtime.configure` selects, both under jemalloc.

    python -m benchmarks.bench_allocator                      # DiT-S/2 b32 and the default config
    python -m benchmarks.bench_allocator --only s2-b128 --steps 2
    python -m benchmarks.bench_allocator --compare dispatch --only default --precision bf16 --steps 40 --rounds 4

Each run is a fresh process (the allocator and the dispatch mode are fixed at process start),
the two variants alternate, one warm step is untimed; per step we report the median seconds,
minor page faults and kernel time, the most faults in any one step (a step that had to map a
second copy of the temporaries), and the process's peak RSS over the timed steps.
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
from benchmarks.workers import peak_rss_bytes, reset_peak_rss, synthetic_batch, train_config

# Variant name -> environment of its processes.
COMPARISONS = {
    "allocator": {"system": {"MMDIT_ALLOCATOR": "system"}, "jemalloc": {"MMDIT_ALLOCATOR": "jemalloc"}},
    "dispatch": {
        "async dispatch": {"MMDIT_ALLOCATOR": "jemalloc", "MMDIT_CPU_ASYNC_DISPATCH": "1"},
        "inline dispatch": {"MMDIT_ALLOCATOR": "jemalloc", "MMDIT_CPU_ASYNC_DISPATCH": "0"},
    },
}


def worker(spec: dict) -> None:
    from jax_mmdit import runtime

    runtime.use_jemalloc()  # re-executes this process under jemalloc unless MMDIT_ALLOCATOR=system
    runtime.configure()
    import jax

    from jax_mmdit.train.trainer import Trainer

    cfg = train_config(spec)
    tr = Trainer(cfg, devices=jax.devices()[:1], with_data=False)
    x, y = synthetic_batch(tr.model_cfg, cfg.batch_size)
    batch = {"image": x, "label": y}
    jax.block_until_ready(tr.train_step(batch)["loss"])  # compile + first touch of the heap
    reset_peak_rss()  # the peak of the timed steps, not of compilation
    secs, faults, sys_s = [], [], []
    for _ in range(spec["steps"]):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        jax.block_until_ready(tr.train_step(batch)["loss"])
        t, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        secs.append(t)
        faults.append(r1.ru_minflt - r0.ru_minflt)
        sys_s.append(r1.ru_stime - r0.ru_stime)
    jemalloc = any("jemalloc" in line for line in open("/proc/self/maps"))
    print(
        json.dumps(
            {
                "s": statistics.median(secs),
                "faults": statistics.median(faults),
                "max_faults": max(faults),
                "sys_s": statistics.median(sys_s),
                "peak_gib": (peak_rss_bytes() or 0) / 2**30,
                "jemalloc": jemalloc,
                "batch": cfg.batch_size,
            }
        )
    )


def run(spec: dict, variant_env: dict) -> dict:
    env = {**os.environ, **variant_env, "PYTHONPATH": str(REPO)}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_allocator", "--worker", json.dumps(spec)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"exit {out.returncode}: {out.stderr[-300:]}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(CPU_CASES), default=["s2-b32", "default"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--rounds", type=int, default=1, help="process pairs (one per variant) per config")
    p.add_argument("--compare", default="allocator", choices=list(COMPARISONS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    variants = COMPARISONS[args.compare]
    names = list(variants)
    print(
        f"| config | {args.compare} | s/step | img/s | vs {names[0]} | faults/step | kernel s/step | "
        "most faults in a step, per process | peak RSS GiB, per process |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key in args.only:
        name, spec = CPU_CASES[key]
        spec = {**spec, "precision": args.precision, "steps": args.steps}
        res = {v: [] for v in names}
        for r in range(args.rounds):
            for v in names if r % 2 == 0 else names[::-1]:
                res[v].append(run(spec, variants[v]))
        base = None
        for v in names:
            ok = [x for x in res[v] if "error" not in x]
            if not ok:
                print(f"| {name} {args.precision} | {v} | error: {res[v][-1]['error'][:120]} | | | | | | |")
                continue
            s = statistics.median(x["s"] for x in ok)
            base = base or s
            wants_jemalloc = variants[v]["MMDIT_ALLOCATOR"] == "jemalloc"
            label = v if not wants_jemalloc or all(x["jemalloc"] for x in ok) else f"{v} (jemalloc not loaded)"
            spikes = ", ".join(str(x["max_faults"]) for x in ok)
            peaks = ", ".join(f"{x['peak_gib']:.2f}" for x in ok)
            print(
                f"| {name} {args.precision} | {label} | {s:.3f} | {ok[0]['batch'] / s:.1f} | {base / s:.2f}x | "
                f"{statistics.median(x['faults'] for x in ok):.0f} | {statistics.median(x['sys_s'] for x in ok):.2f} | "
                f"{spikes} | {peaks} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
