"""Building and loading the kernel library: once per process, at start-up, never inside a trace.

The sources (`*.cc`, `*.h` next to this file) are compiled with the system C++ compiler (`CXX`,
default g++) against Debian's libdnnl-dev (`make setup` installs both) into a cache directory
(`jax_mmdit.cache.cache_root()`: `MMDIT_CACHE_DIR`, default ~/.cache/jax_mmdit), one file per
source and jaxlib version, and their FFI handlers registered with XLA. Where that fails, `load`
says why and the caller falls back.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import jax

from jax_mmdit.cache import cache_root
from jax_mmdit.ops.onednn.calls import HANDLERS

_DIR = Path(__file__).parent
SOURCES = (_DIR / "onednn_kernels.cc", _DIR / "attention_kernels.cc", _DIR / "row_kernels.cc")
HEADERS = (_DIR / "common.h", _DIR / "onednn_common.h")


def library_path() -> Path:
    # A new kernel source or jaxlib (FFI headers) gets its own file: stale builds are never loaded.
    key = hashlib.sha256(b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS)) + jax.lib.__version__.encode())
    return cache_root() / f"onednn_kernels-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compile the library if this source/jaxlib has no build yet; returns its path. Raises
    RuntimeError with the compiler's first error line when it cannot be built."""
    path = library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    # Written to a temporary name and renamed: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [
        cxx,
        "-O2",
        "-shared",
        "-fPIC",
        "-fopenmp",
        "-std=c++17",
        "-w",
        f"-I{jax.ffi.include_dir()}",
        *map(str, SOURCES),
        "-o",
        tmp,
        "-ldnnl",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        os.unlink(tmp)
        raise RuntimeError(f"no C++ compiler ({cxx}): {e}") from None
    if proc.returncode != 0:
        os.unlink(tmp)
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines()[-1:]
        raise RuntimeError(f"{cmd[0]} failed: {lines[0] if lines else proc.returncode}")
    os.replace(tmp, path)
    return path


@functools.cache
def load() -> str | None:
    """Build (if needed) and load the library and register every kernel's FFI handler with XLA,
    once per process. Returns None when ready, else the reason it is not."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        return str(e)
    for target, symbol in HANDLERS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None
