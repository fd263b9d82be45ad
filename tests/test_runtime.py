"""Process-wide runtime settings (jax_mmdit.runtime), each checked in a fresh interpreter."""

import json
import os
import subprocess
import sys

import pytest

# Runs SETUP (a runtime call), then writes, frees and again writes a 256 MiB malloc block (what
# XLA:CPU does with its buffers every step; numpy is avoided because it asks for huge pages) and
# counts the second write's page faults. CDLL(None) is the process's malloc: a preloaded one if any.
_PROBE = """
import ctypes, json, os, resource
from jax_mmdit import runtime
SETUP
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 * 2**20
def touch():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p
libc.free(touch())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
libc.free(touch())
print(json.dumps({
    "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "jemalloc": any("jemalloc" in line for line in open("/proc/self/maps")), "pid": os.getpid(),
}))
"""


def _run(setup: str, env_extra: dict) -> tuple[dict, int]:
    drop = ("XLA_FLAGS", "JAX_PLATFORMS", "LD_PRELOAD", "MALLOC_CONF", "MMDIT_ALLOCATOR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra)
    p = subprocess.Popen(
        [sys.executable, "-c", _PROBE.replace("SETUP", setup)], env=env, stdout=subprocess.PIPE, text=True
    )
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0
    return json.loads(out.strip().splitlines()[-1]), p.pid


def configure(env_extra: dict) -> dict:
    return _run("runtime.configure()", env_extra)[0]


def test_configure_adds_cpu_flags_but_user_flags_win():
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in configure({})["xla_flags"]
    res = configure({"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"})
    assert res["xla_flags"] == "--xla_cpu_enable_concurrency_optimized_scheduler=true"


@pytest.mark.skipif(sys.platform != "linux", reason="jemalloc preloading is Linux-only")
def test_entry_points_restart_with_jemalloc_and_reuse_freed_memory():
    from jax_mmdit import runtime

    if runtime.find_jemalloc() is None:
        pytest.skip("libjemalloc2 not installed (make setup / .ci/run install it)")
    use = "runtime.use_jemalloc()"  # restarts the interpreter with jemalloc preloaded where it applies
    res, pid = _run(use, {"JAX_PLATFORMS": "cpu"})
    assert res["jemalloc"] and res["pid"] == pid  # exec, not a child: signals still reach it
    assert res["faults"] < 1000, res
    system, _ = _run(use, {"JAX_PLATFORMS": "cpu", "MMDIT_ALLOCATOR": "system"})
    assert not system["jemalloc"] and system["faults"] > 10_000, system
    gpu, _ = _run(use, {"JAX_PLATFORMS": "cuda"})
    assert not gpu["jemalloc"]


# A ~0.1-0.3 s program: when the call returns, is its result already there (inline dispatch, which
# frees the program's temporaries before it returns) or still being computed (async dispatch)?
_DISPATCH_PROBE = """
import json
from jax_mmdit import runtime
runtime.configure()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ x), x))
x = jnp.full((768, 768), 1e-3, jnp.float32)
jax.block_until_ready(f(x))
y = f(x)
print(json.dumps({"ready_on_return": y.is_ready()}))
"""


def test_configure_turns_off_async_cpu_dispatch_unless_asked():
    def ready_on_return(env_extra: dict) -> bool:
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MMDIT_CPU_ASYNC_DISPATCH")}
        out = subprocess.run(
            [sys.executable, "-c", _DISPATCH_PROBE],
            env={**env, "JAX_PLATFORMS": "cpu", **env_extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-500:]
        return json.loads(out.stdout.strip().splitlines()[-1])["ready_on_return"]

    assert ready_on_return({})
    assert not ready_on_return({"MMDIT_CPU_ASYNC_DISPATCH": "1"})
