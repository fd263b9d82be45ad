"""Process-wide settings that must be in place before JAX starts (entry points call `configure`).

Each flag below was measured (see docs/performance.md, which also lists flags that did not help):
- `--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default scheduler keeps
  many buffers alive at once for parallelism; turning it off cut temp memory 6.0 → 4.1 GiB for
  DiT-S/2 at batch 32 and lets batch 128 fit in 24 GB (26 GB asked otherwise). It is also faster
  on 2 cores: DiT-S/2 batch 32 train step 1.40x (fp32) and 1.06x (bf16) the default's img/s,
  XLA plan 6.01 → 4.45 GiB (fp32), 5.44 → 3.91 GiB (bf16) (2-core Xeon with AMX, alternated runs).
Users' own XLA_FLAGS win: we only add flags they did not set.

Opt-in (`MMDIT_RETAIN_FREED_MEMORY=1`), on CPU-only Linux hosts: glibc malloc keeps freed memory
(`retain_freed_memory`). XLA:CPU allocates its buffers at every step and frees them after, and by
default glibc hands big blocks straight back to the kernel, so every step page-faults its whole
working set in again (DiT-S/2 fp32 train step: 1.2 M page faults and 2.3 s of kernel time per step
at batch 32, 5 M and 13 s at batch 128). Retained: batch 32 1.16x img/s, 0 faults. It is not the
default because the single-arena heap fragments: the default config's train step held 4.2 GB
instead of 1.4 GB, and DiT-S/2 fp32 at batch 128 no longer fit in 24 GB (see docs/performance.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import os
import platform
import sys

CPU_XLA_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Set to "1" to make `configure` keep freed memory in the heap (faster steps, more memory).
RETAIN_ENV = "MMDIT_RETAIN_FREED_MEMORY"
retained_freed_memory = False  # whether `retain_freed_memory` took effect in this process


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


def retain_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel: no mmap for
    big blocks (they come from the heap), never trim the heap, one arena (thread arenas cannot
    grow past 64 MiB, so big blocks would go back to mmap). The process keeps its peak heap; a
    training step reaches that peak every step anyway. Takes effect only before XLA's threads
    first allocate, i.e. before JAX starts. Off unless MMDIT_RETAIN_FREED_MEMORY=1 (see the module
    docstring for what it costs). Returns whether it was applied."""
    global retained_freed_memory
    if os.environ.get(RETAIN_ENV, "0") != "1" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt takes an int; -1 becomes SIZE_MAX inside glibc ("never trim").
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    retained_freed_memory = ok and libc.mallopt(_M_ARENA_MAX, 1) == 1
    return retained_freed_memory


# "jemalloc" (the default where it is installed) or "system": the allocator `use_jemalloc` picks.
ALLOCATOR_ENV = "MMDIT_ALLOCATOR"
# Never hand freed pages back to the kernel: a training step reuses them at the next step.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2")


def find_jemalloc() -> str | None:
    found = ctypes.util.find_library("jemalloc")
    return found or next((p for p in _JEMALLOC_PATHS if os.path.exists(p)), None)


def use_jemalloc() -> None:
    """Command-line entry points only: restart this process (same pid, same arguments) with jemalloc
    preloaded, on CPU-only Linux hosts where it is installed (Debian: libjemalloc2), unless
    MMDIT_ALLOCATOR=system. XLA:CPU allocates a step's buffers at every execution and glibc returns
    big blocks to the kernel, so each step page-faulted its working set back in: DiT-S/2 fp32 at
    batch 128 5.0 M faults and 13 s of kernel time per 31.5 s step; with jemalloc (decay off)
    22.7-23.2 s, 2 k faults, peak RSS 18.0 GB against 17.3 (docs/performance.md)."""
    if (os.environ.get(ALLOCATOR_ENV, "jemalloc") != "jemalloc" or platform.system() != "Linux"
            or "jemalloc" in os.environ.get("LD_PRELOAD", "") or not _cpu_only()):
        return
    lib = find_jemalloc()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = f"{lib} {env.get('LD_PRELOAD', '')}".strip()
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
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
    if _cpu_only():
        retain_freed_memory()
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
