"""The small CPU kernels alone, against XLA, in one process: each operation of `OnednnOps` (the
package's kernels) against the same operation of `XlaCpuOps` (XLA's own ops):

- adaLN (`ln_modulate`), forward and forward + backward;
- a dense layer's backward (dx, dW, db in one `dense_backward` call) against XLA's;
- adaLN-Zero's gated residual x + gate * a, forward + backward;
- MMDiT's QK-norm (`rms_norm` over (B, L, H, D) heads), forward + backward;
- self-attention from the packed (B, L, 3, H, D) projection: the packed kernels against splitting
  q, k, v out and calling the unpacked ones (the gradient then needs a concatenate).

    python -m benchmarks.bench_kernels              # DiT-S/2 b32 and default-config shapes
    python -m benchmarks.bench_kernels --rounds 60

Median ms per call; the variants are timed in alternation. Re-executes itself with jemalloc where
installed, as `mmdit` runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks.bench_attention import median_ms
from benchmarks.workers import cpu_name

# adaLN (name, B, L, D); bias gradient (name, M, N): DiT-S/2 at 32x32 batch 32 (fc1, qkv, proj) and
# the default fashion_mnist config at batch 128 (fc1, qkv).
ADALN_SHAPES = [("DiT-S/2 b32", 32, 256, 384), ("default b128", 128, 49, 192)]
# dense backward (name, M, K, N): DiT-S/2 b32 fc1 and fc2, default config fc1 and qkv.
DENSE_SHAPES = [
    ("DiT-S/2 b32 fc1", 8192, 384, 1536),
    ("DiT-S/2 b32 fc2", 8192, 1536, 384),
    ("default fc1", 6272, 192, 768),
    ("default qkv", 6272, 192, 576),
]
# QK-norm (name, B, L, H, D): MMDiT-S/2 at 32x32 batch 32 (image stream), MMDiT-B/2 batch 32.
RMS_SHAPES = [("MMDiT-S/2 b32", 32, 256, 6, 64), ("MMDiT-B/2 b32", 32, 256, 12, 64)]
# packed self-attention (name, B, L, H, D)
PACKED_SHAPES = [("DiT-S/2 b32", 32, 256, 6, 64), ("default b128", 128, 49, 3, 64)]


def _time(fns: dict, args: tuple, rounds: int) -> dict[str, float]:
    import jax

    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {n: median_ms(t) for n, t in times.items()}


def _backends():
    from jax_mmdit.ops import XlaCpuOps
    from jax_mmdit.ops.onednn import OnednnOps

    return {"kernel": OnednnOps(), "xla": XlaCpuOps()}


def _with_vjp(f, cotangent):
    """f's output and the vjp of `cotangent`, as one function (the output is returned too:
    otherwise XLA drops a forward the backward does not read)."""
    import jax

    return lambda *a: (lambda y, vjp: (y, vjp(cotangent)))(*jax.vjp(f, *a))


def adaln_rows(B: int, L: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
    shift, scale = (jnp.asarray(rng.standard_normal((B, D)) * 0.1, jnp.float32) for _ in range(2))
    dh = jnp.asarray(rng.standard_normal((B, L, D)), dtype)
    fns = {}
    for label, ops in _backends().items():
        f = lambda x, sh, sc, ops=ops: ops.ln_modulate(x, sh, sc, dtype, 1e-6)  # noqa: E731
        fns[f"{label} fwd"] = jax.jit(f)
        fns[f"{label} fwd+bwd"] = jax.jit(_with_vjp(f, dh))
    for fn in fns.values():
        jax.block_until_ready(fn(x, shift, scale))
    return _time(fns, (x, shift, scale), rounds)


def dense_backward_rows(M: int, K: int, N: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(dtype_name)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w, b = jnp.asarray(rng.standard_normal((K, N)), jnp.float32), jnp.zeros((N,), jnp.float32)
    fns = {}
    for label, ops in _backends().items():
        f = lambda x, w, b, ops=ops: ops.dense(x, w, b, dtype)  # noqa: E731
        dz = jnp.asarray(rng.standard_normal((M, N)), jax.eval_shape(f, x, w, b).dtype)  # the output's dtype
        fns[label] = jax.jit(lambda x, w, b, f=f, dz=dz: jax.vjp(f, x, w, b)[1](dz))
    for fn in fns.values():
        jax.block_until_ready(fn(x, w, b))
    return _time(fns, (x, w, b), rounds)


def gated_residual_rows(B: int, L: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x, dy = (jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32) for _ in range(2))
    gate = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((B, L, D)), jnp.dtype(dtype_name))
    fns = {label: jax.jit(_with_vjp(ops.gated_residual, dy)) for label, ops in _backends().items()}
    for fn in fns.values():
        jax.block_until_ready(fn(x, gate, a))
    return _time(fns, (x, gate, a), rounds)


def rms_norm_rows(B: int, L: int, H: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    x, dy = (jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.dtype(dtype_name)) for _ in range(2))
    scale = jnp.ones((D,), jnp.float32)
    fns = {
        label: jax.jit(_with_vjp(lambda x, s, ops=ops: ops.rms_norm(x, s, 1e-6), dy))
        for label, ops in _backends().items()
    }
    for fn in fns.values():
        jax.block_until_ready(fn(x, scale))
    return _time(fns, (x, scale), rounds)


def packed_attention_rows(B: int, L: int, H: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_mmdit.ops.onednn import calls

    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.standard_normal((B, L, 3, H, D)), jnp.dtype(dtype_name))
    do = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.dtype(dtype_name))

    def split(qkv):
        q, k, v = (a[:, :, 0] for a in jnp.split(qkv, 3, axis=2))
        o = calls.attention_forward(q, k, v)
        return o, jnp.stack(calls.attention_backward(q, k, v, do), axis=2)

    fns = {
        "packed": jax.jit(lambda qkv: (calls.attention_packed_forward(qkv), calls.attention_packed_backward(qkv, do))),
        "split + concatenate": jax.jit(split),
    }
    for fn in fns.values():
        jax.block_until_ready(fn(qkv))
    return _time(fns, (qkv,), rounds)


def _speedup_table(header: str, cases: list, run, new: str, old: str, rounds: int) -> None:
    """A markdown table: for each (name, *shape) case and dtype, ms per call of the variants `new`
    and `old` (keys of run(*shape, dtype, rounds)) and old / new."""
    print()
    print(f"| {header} | dtype | {new} | {old} | speed-up |")
    print("|---|---|---|---|---|")
    for name, *shape in cases:
        for dtype in ("bfloat16", "float32"):
            r = run(*shape, dtype, rounds)
            print(
                f"| {name} ({', '.join(map(str, shape))}) | {dtype} | {r[new]:.2f} | {r[old]:.2f} | "
                f"{r[old] / r[new]:.2f}x |",
                flush=True,
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)

    from jax_mmdit import runtime

    runtime.use_jemalloc()
    runtime.configure()
    from jax_mmdit.ops import onednn

    reason = onednn.load()
    if reason is not None:
        print(f"the kernels are unavailable here: {reason}", file=sys.stderr)
        return 1
    malloc = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"
    print(f"# bench_kernels on {cpu_name()}: median ms per call over {args.rounds} alternated rounds; malloc: {malloc}")
    print("| adaLN (B, L, D) | dtype | kernel fwd | xla fwd | kernel fwd+bwd | xla fwd+bwd | speed-up fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for name, B, L, D in ADALN_SHAPES:
        for dtype in ("bfloat16", "float32"):
            r = adaln_rows(B, L, D, dtype, args.rounds)
            print(
                f"| {name} ({B}, {L}, {D}) | {dtype} | {r['kernel fwd']:.2f} | {r['xla fwd']:.2f} | "
                f"{r['kernel fwd+bwd']:.2f} | {r['xla fwd+bwd']:.2f} | {r['xla fwd+bwd'] / r['kernel fwd+bwd']:.2f}x |"
            )
    _speedup_table("dense backward (M, K, N)", DENSE_SHAPES, dense_backward_rows, "kernel", "xla", args.rounds)
    _speedup_table(
        "gated residual fwd+bwd (B, L, D), dtype of a", ADALN_SHAPES, gated_residual_rows, "kernel", "xla", args.rounds
    )
    _speedup_table("QK-norm fwd+bwd (B, L, H, D)", RMS_SHAPES, rms_norm_rows, "kernel", "xla", args.rounds)
    _speedup_table(
        "self-attention fwd+bwd (B, L, H, D)",
        PACKED_SHAPES,
        packed_attention_rows,
        "packed",
        "split + concatenate",
        args.rounds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
