"""Process-wide settings that must be in place before JAX starts (entry points call `configure`).

- `--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default scheduler keeps
  many buffers alive at once for parallelism; off, DiT-S/2's step needs about a third less
  memory (batch 128 fits in 24 GB) and runs faster on 2 cores. Users' own XLA_FLAGS win.
- JAX's CPU dispatch is made inline (`MMDIT_CPU_ASYNC_DISPATCH=1` keeps it asynchronous): the
  asynchronous path marks a program's outputs ready before it frees its temporaries, so the next
  step could allocate its own beside them, and a heap that keeps freed pages (jemalloc) then
  kept both.
- Command-line entry points restart themselves with jemalloc on CPU-only Linux hosts
  (`use_jemalloc`): XLA:CPU allocates a step's buffers at every execution, and glibc handed big
  blocks back to the kernel, so every step page-faulted its working set in again.

The measurements behind each are in docs/performance.md (`python -m benchmarks.bench_allocator`).
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
    MMDIT_ALLOCATOR=system (see the module docstring)."""
    if (
        os.environ.get(ALLOCATOR_ENV, "jemalloc") != "jemalloc"
        or platform.system() != "Linux"
        or "jemalloc" in os.environ.get("LD_PRELOAD", "")
        or not _cpu_only()
    ):
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
    # Orbax/absl warn at WARNING level about routine things (read-only managers, async saves), and
    # log a failed save or restore with its traceback from a background thread before the error
    # reaches us (which then reports it in one line): only MMDIT_DEBUG shows those.
    debug = bool(os.environ.get("MMDIT_DEBUG"))
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR if debug else absl_logging.FATAL)
    except ImportError:
        pass
    if not debug:
        import logging

        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
