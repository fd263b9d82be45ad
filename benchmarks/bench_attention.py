"""Attention alone on CPU: the fused oneDNN kernel against the same attention as separate (oneDNN)
matmuls with XLA's softmax (`attention="xla"`), and PyTorch's CPU flash attention, in one process.

    python -m benchmarks.bench_attention            # DiT-S/2 b32 and default-config shapes
    python -m benchmarks.bench_attention --rounds 30

Forward, and forward + backward (the vjp of one cotangent), median ms per call; the jax rows are
timed in alternation so machine noise hits them alike. Run it under the allocator `mmdit` uses
(`runtime.jemalloc_env`): this script re-executes itself with jemalloc preloaded when it can.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.workers import cpu_name

# (name, B, L, H, D): DiT-S/2 at 32x32 batch 32; the default fashion_mnist config at batch 128.
SHAPES = [("DiT-S/2 b32", 32, 256, 6, 64), ("default b128", 128, 49, 3, 64)]


def median_ms(times: list[float]) -> float:
    times = sorted(times)
    return 1e3 * times[len(times) // 2]


def jax_rows(B: int, L: int, H: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_mmdit.ops.onednn import OnednnOps

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, L, H, D)), dtype) for _ in range(3))
    do = jnp.asarray(rng.standard_normal((B, L, H * D)), dtype)
    fns = {}
    for impl, label in (("auto", "fused"), ("xla", "xla softmax")):
        f = OnednnOps(attention_impl=impl).attention
        fns[f"{label} fwd"] = jax.jit(f)
        # The output is returned too: the fused backward recomputes the probabilities and does not
        # read the forward's output, so XLA would drop the forward from a gradient-only function.
        fns[f"{label} fwd+bwd"] = jax.jit(lambda q, k, v, f=f: (lambda o, vjp: (o, vjp(do)))(*jax.vjp(f, q, k, v)))
    times: dict[str, list[float]] = {n: [] for n in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(q, k, v))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            times[name].append(time.perf_counter() - t0)
    return {n: median_ms(t) for n, t in times.items()}


def torch_rows(B: int, L: int, H: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.set_flush_denormal(True)
    dtype = getattr(torch, dtype_name)
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, L, D, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = {}
    for name in ("fwd", "fwd+bwd"):
        times = []
        for _ in range(rounds + 2):
            t0 = time.perf_counter()
            if name == "fwd":
                with torch.no_grad():
                    sdpa(q, k, v)
            else:
                sdpa(q, k, v).backward(do)
            times.append(time.perf_counter() - t0)
        out[f"torch flash {name}"] = median_ms(times[2:])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)

    from jax_mmdit import runtime

    runtime.use_jemalloc()  # re-executes with jemalloc where installed, as `mmdit` runs
    runtime.configure()
    from jax_mmdit.ops import onednn

    reason = onednn.load()
    if reason is not None:
        print(f"the oneDNN kernels are unavailable here: {reason}", file=sys.stderr)
        return 1
    print(
        f"# bench_attention on {cpu_name()}: median ms per call over {args.rounds} alternated rounds; "
        f"malloc: {'jemalloc' if 'jemalloc' in os.environ.get('LD_PRELOAD', '') else 'system'}"
    )
    print(
        "| shape (B, L, H, D) | dtype | fused fwd | xla softmax fwd | torch flash fwd | fused fwd+bwd | "
        "xla softmax fwd+bwd | torch flash fwd+bwd | fused speed-up fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, B, L, H, D in SHAPES:
        for dtype in ("bfloat16", "float32"):
            r = jax_rows(B, L, H, D, dtype, args.rounds)
            if not args.no_torch:
                r.update(torch_rows(B, L, H, D, dtype, args.rounds))
            cells = [
                r.get(k)
                for k in (
                    "fused fwd",
                    "xla softmax fwd",
                    "torch flash fwd",
                    "fused fwd+bwd",
                    "xla softmax fwd+bwd",
                    "torch flash fwd+bwd",
                )
            ]
            speedup = r["xla softmax fwd+bwd"] / r["fused fwd+bwd"]
            print(
                f"| {name} ({B}, {L}, {H}, {D}) | {dtype} | "
                + " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
                + f" | {speedup:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
