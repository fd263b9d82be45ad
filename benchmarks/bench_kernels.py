"""The small CPU kernels alone, against what they replaced, in one process:

- adaLN (`layers.ln_modulate`): the C++ kernels against XLA's version of the same function
  (traced with MMDIT_ONEDNN=off), forward and forward + backward;
- the dense layers' bias gradient: `onednn.column_sum` against XLA's float32 sum and against a
  ones-row oneDNN matmul (what the layers used before);
- a dense layer's whole backward: `onednn.dense_backward` (dx, dW, db one after another in one call)
  against the three calls XLA ran concurrently before (two `onednn.matmul`s and `column_sum`);
- adaLN-Zero's gated residual x + gate * a (`layers.gated_residual`), kernel backward against XLA's;
- MMDiT's QK-norm (`layers.RMSNorm` over (B, L, H, D) heads), kernels against XLA's;
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

from benchmarks.bench_attention import _median_ms
from benchmarks.workers import cpu_name

# adaLN (name, B, L, D); bias gradient (name, M, N): DiT-S/2 at 32x32 batch 32 (fc1, qkv, proj) and
# the default fashion_mnist config at batch 128 (fc1, qkv).
ADALN_SHAPES = [("DiT-S/2 b32", 32, 256, 384), ("default b128", 128, 49, 192)]
# dense backward (name, M, K, N): DiT-S/2 b32 fc1 and fc2, default config fc1 and qkv.
DENSE_SHAPES = [("DiT-S/2 b32 fc1", 8192, 384, 1536), ("DiT-S/2 b32 fc2", 8192, 1536, 384),
                ("default fc1", 6272, 192, 768), ("default qkv", 6272, 192, 576)]
# QK-norm (name, B, L, H, D): MMDiT-S/2 at 32x32 batch 32 (image stream), MMDiT-B/2 batch 32.
RMS_SHAPES = [("MMDiT-S/2 b32", 32, 256, 6, 64), ("MMDiT-B/2 b32", 32, 256, 12, 64)]
# packed self-attention (name, B, L, H, D)
PACKED_SHAPES = [("DiT-S/2 b32", 32, 256, 6, 64), ("default b128", 128, 49, 3, 64)]
BIAS_SHAPES = [("DiT-S/2 b32 fc1", 8192, 1536), ("DiT-S/2 b32 qkv", 8192, 1152), ("DiT-S/2 b32 proj", 8192, 384),
               ("default fc1", 6272, 768), ("default qkv", 6272, 576)]


def _time(fns: dict, args: tuple, rounds: int) -> dict[str, float]:
    import jax

    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {n: _median_ms(t) for n, t in times.items()}


def adaln_rows(B: int, L: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_mmdit.kernels import onednn
    from jax_mmdit.models import layers

    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
    shift, scale = (jnp.asarray(rng.standard_normal((B, D)) * 0.1, jnp.float32) for _ in range(2))
    dh = jnp.asarray(rng.standard_normal((B, L, D)), dtype)
    f = lambda x, sh, sc: layers.ln_modulate(x, sh, sc, dtype)  # noqa: E731
    fns = {}
    for label, mode in (("kernel", "on"), ("xla", "off")):
        os.environ[onednn.ENV] = mode  # read when tracing: the first call below
        fns[f"{label} fwd"] = jax.jit(f)
        # The output is returned too: otherwise XLA drops a forward the backward does not read.
        fns[f"{label} fwd+bwd"] = jax.jit(lambda x, sh, sc: (lambda h, vjp: (h, vjp(dh)))(*jax.vjp(f, x, sh, sc)))
        for name in (f"{label} fwd", f"{label} fwd+bwd"):
            jax.block_until_ready(fns[name](x, shift, scale))
    os.environ[onednn.ENV] = "auto"
    return _time(fns, (x, shift, scale), rounds)


def bias_rows(M: int, N: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_mmdit.kernels import onednn

    dz = jnp.asarray(np.random.default_rng(0).standard_normal((M, N)), jnp.dtype(dtype_name))
    fns = {
        "column_sum": jax.jit(onednn.column_sum),
        "xla sum": jax.jit(lambda d: jnp.sum(d, axis=0, dtype=jnp.float32)),
        "ones-row matmul": jax.jit(lambda d: onednn.matmul(jnp.ones((1, d.shape[0]), d.dtype), d)[0]),
    }
    for fn in fns.values():
        jax.block_until_ready(fn(dz))
    return _time(fns, (dz,), rounds)



def dense_backward_rows(M: int, K: int, N: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_mmdit.kernels import onednn

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(dtype_name)
    x, w, dz = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((M, K), (K, N), (M, N)))
    fns = {
        "one call": jax.jit(onednn.dense_backward),
        "three calls": jax.jit(lambda x, w, dz: (onednn.matmul(dz, w, transpose_b=True, out_dtype=x.dtype),
                                                 onednn.matmul(x, dz, transpose_a=True), onednn.column_sum(dz))),
    }
    for fn in fns.values():
        jax.block_until_ready(fn(x, w, dz))
    return _time(fns, (x, w, dz), rounds)


def gated_residual_rows(B: int, L: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_mmdit.kernels import onednn
    from jax_mmdit.models import layers

    rng = np.random.default_rng(0)
    x, dy = (jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32) for _ in range(2))
    gate = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((B, L, D)), jnp.dtype(dtype_name))
    fns = {}
    for label, mode in (("kernel", "on"), ("xla", "off")):
        os.environ[onednn.ENV] = mode  # read when tracing: the first call below
        fns[label] = jax.jit(lambda x, g, a: (lambda y, vjp: (y, vjp(dy)))(*jax.vjp(layers.gated_residual, x, g, a)))
        jax.block_until_ready(fns[label](x, gate, a))
    os.environ[onednn.ENV] = "auto"
    return _time(fns, (x, gate, a), rounds)



def rms_norm_rows(B: int, L: int, H: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jax_mmdit.kernels import onednn
    from jax_mmdit.models import layers

    rng = np.random.default_rng(0)
    x, dy = (jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.dtype(dtype_name)) for _ in range(2))
    graphdef, params = nnx.split(layers.RMSNorm(D))
    f = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
    fns = {}
    for label, mode in (("kernel", "on"), ("xla", "off")):
        os.environ[onednn.ENV] = mode  # read when tracing: the first call below
        fns[label] = jax.jit(lambda p, x: (lambda y, vjp: (y, vjp(dy)))(*jax.vjp(f, p, x)))
        jax.block_until_ready(fns[label](params, x))
    os.environ[onednn.ENV] = "auto"
    return _time(fns, (params, x), rounds)

def packed_attention_rows(B: int, L: int, H: int, D: int, dtype_name: str, rounds: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_mmdit.kernels import onednn

    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.standard_normal((B, L, 3, H, D)), jnp.dtype(dtype_name))
    do = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.dtype(dtype_name))

    def split(qkv):
        q, k, v = (a[:, :, 0] for a in jnp.split(qkv, 3, axis=2))
        o = onednn.attention_forward(q, k, v)
        return o, jnp.stack(onednn.attention_backward(q, k, v, do), axis=2)

    fns = {
        "packed": jax.jit(lambda qkv: (onednn.attention_packed_forward(qkv), onednn.attention_packed_backward(qkv, do))),
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
            print(f"| {name} ({', '.join(map(str, shape))}) | {dtype} | {r[new]:.2f} | {r[old]:.2f} | "
                  f"{r[old] / r[new]:.2f}x |", flush=True)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args(argv)

    from jax_mmdit import runtime

    runtime.use_jemalloc()
    runtime.configure()
    from jax_mmdit.kernels import onednn

    if not onednn.enabled():
        print("the kernels are not enabled here (MMDIT_ONEDNN, or they did not build)", file=sys.stderr)
        return 1
    malloc = "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system"
    print(f"# bench_kernels on {cpu_name()}: median ms per call over {args.rounds} alternated rounds; malloc: {malloc}")
    print("| adaLN (B, L, D) | dtype | kernel fwd | xla fwd | kernel fwd+bwd | xla fwd+bwd | speed-up fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for name, B, L, D in ADALN_SHAPES:
        for dtype in ("bfloat16", "float32"):
            r = adaln_rows(B, L, D, dtype, args.rounds)
            print(f"| {name} ({B}, {L}, {D}) | {dtype} | {r['kernel fwd']:.2f} | {r['xla fwd']:.2f} | "
                  f"{r['kernel fwd+bwd']:.2f} | {r['xla fwd+bwd']:.2f} | {r['xla fwd+bwd'] / r['kernel fwd+bwd']:.2f}x |")
    print()
    print("| bias gradient (M, N) | dtype | column_sum | xla sum | ones-row matmul |")
    print("|---|---|---|---|---|")
    for name, M, N in BIAS_SHAPES:
        for dtype in ("bfloat16", "float32"):
            r = bias_rows(M, N, dtype, args.rounds)
            print(f"| {name} ({M}, {N}) | {dtype} | {r['column_sum']:.3f} | {r['xla sum']:.3f} | "
                  f"{r['ones-row matmul']:.3f} |", flush=True)
    _speedup_table("dense backward (M, K, N)", DENSE_SHAPES, dense_backward_rows, "one call", "three calls", args.rounds)
    _speedup_table("gated residual fwd+bwd (B, L, D), dtype of a", ADALN_SHAPES, gated_residual_rows, "kernel", "xla",
                   args.rounds)
    _speedup_table("QK-norm fwd+bwd (B, L, H, D)", RMS_SHAPES, rms_norm_rows, "kernel", "xla", args.rounds)
    _speedup_table("self-attention fwd+bwd (B, L, H, D)", PACKED_SHAPES, packed_attention_rows, "packed",
                   "split + concatenate", args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
