"""Process-wide settings that must be in place before JAX starts (entry points call `configure`).

Each flag below was measured (see docs/performance.md, which also lists flags that did not help):
- `--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default scheduler keeps
  many buffers alive at once for parallelism; turning it off cut temp memory 6.0 → 4.1 GiB for
  DiT-S/2 at batch 32 and lets batch 128 fit in 24 GB (26 GB asked otherwise). It is also faster
  on 2 cores: DiT-S/2 batch 32 train step 1.40x (fp32) and 1.06x (bf16) the default's img/s,
  XLA plan 6.01 → 4.45 GiB (fp32), 5.44 → 3.91 GiB (bf16) (2-core Xeon with AMX, alternated runs).
Users' own XLA_FLAGS win: we only add flags they did not set.

`configure` also turns off JAX's asynchronous dispatch on the CPU client (`CPU_ASYNC_ENV`=1 keeps
it). XLA:CPU's asynchronous path marks a program's outputs ready *before* it frees the program's
temporary buffers, so a step dispatched as soon as the previous one's loss is ready now and then
allocates its temporaries while the previous step's are still held: a heap that keeps freed pages
(jemalloc) then keeps two copies for good. `python -m benchmarks.bench_allocator --compare
dispatch`, peak RSS per process, async vs inline: default config bf16 1.93-1.95 GB in 4 of 4
processes vs 1.43-1.54 GB; DiT-S/2 bf16 b128 8.52 and 15.02 GB vs 8.50 and 8.44 GB; fp32 b128
OOM-killed at 24 GB vs 13.67 GB; step time 0.99-1.02x. Inline execution frees the temporaries before it returns.

Command-line entry points also restart themselves with jemalloc on CPU-only Linux hosts
(`use_jemalloc`): measured in docs/performance.md, `python -m benchmarks.bench_allocator`.
"""

from __future__ import annotations

import ctypes.util
import importlib.metadata
import os
import platform
import sys

CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)
CPU_ASYNC_ENV = "MMDIT_CPU_ASYNC_DISPATCH"  # "1": keep JAX's asynchronous CPU dispatch


def _cpu_only() -> bool:
    """Will JAX run on the CPU? Decided without starting JAX (malloc must be set before XLA's
    threads first allocate): JAX_PLATFORMS when set, else no accelerator plugin installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
    try:
        import jax_plugins  # namespace package of jax's CUDA/ROCm plugins

        for path in jax_plugins.__path__:
            plugins |= {n for n in os.listdir(path) if not n.startswith(("_", "."))}
    except ImportError:
        pass
    try:
        importlib.metadata.distribution("libtpu")
        plugins.add("libtpu")
    except importlib.metadata.PackageNotFoundError:
        pass
    return not plugins


# "jemalloc" (the default where it is installed) or "system": the allocator `use_jemalloc` picks.
ALLOCATOR_ENV = "MMDIT_ALLOCATOR"
# Never hand freed pages back to the kernel: a training step reuses them at the next step.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find_jemalloc() -> str | None:
    return ctypes.util.find_library("jemalloc")  # e.g. "libjemalloc.so.2" (ldconfig's cache)


def jemalloc_env(env: dict[str, str], lib: str) -> dict[str, str]:
    """`env` with jemalloc (`lib`, from find_jemalloc) preloaded and decay off unless MALLOC_CONF is set."""
    env = dict(env)
    env["LD_PRELOAD"] = f"{lib} {env.get('LD_PRELOAD', '')}".strip()
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return env


def use_jemalloc() -> None:
    """Command-line entry points only: restart this process (same pid, same arguments) with jemalloc
    preloaded, on CPU-only Linux hosts where it is installed (Debian: libjemalloc2), unless
    MMDIT_ALLOCATOR=system. XLA:CPU allocates a step's buffers at every execution and glibc returns
    big blocks to the kernel, so each step page-faulted its working set back in: DiT-S/2 fp32 at
    batch 128 4.7 M faults and 20 s of kernel time per 34.9 s step; with jemalloc (decay off)
    23.1 s, 1.7 k faults, peak RSS 18.0 GB against 17.8 (`python -m benchmarks.bench_allocator`)."""
    if (os.environ.get(ALLOCATOR_ENV, "jemalloc") != "jemalloc" or platform.system() != "Linux"
            or "jemalloc" in os.environ.get("LD_PRELOAD", "") or not _cpu_only()):
        return
    lib = find_jemalloc()
    if lib is None:
        return
    env = jemalloc_env(os.environ, lib)
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps `-m module` forms; the preload makes the check above false after the exec.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def configure() -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in CPU_XLA_FLAGS:
        name = flag.split("=")[0]
        if name not in flags:
            flags = f"{flags} {flag}"
    os.environ["XLA_FLAGS"] = flags.strip()
    if os.environ.get(CPU_ASYNC_ENV, "0") != "1":
        import jax

        # Read when the CPU client is created: after JAX has started it is too late (and harmless).
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    # Orbax/absl warn at WARNING level about routine things (read-only managers, async saves).
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    # Grain 0.2.18 workers read an absl flag before absl has parsed argv (upstream bug): mark parsed.
    try:
        from absl import flags as absl_flags

        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
    except ImportError:
        pass
