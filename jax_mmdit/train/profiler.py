"""Model FLOPs utilisation (MFU), device memory, and `profile_training` (`mmdit profile`). FLOPs of
a compiled step come from the backend's hook, `Ops.flops`."""

from __future__ import annotations

import time

import jax
import numpy as np

from jax_mmdit.train import mesh as mesh_lib

# Dense peak FLOP/s per chip (no sparsity), by compute dtype. Sources: vendor datasheets.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},  # SXM; PCIe is ~25% lower
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 2},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 2},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12 / 2},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12 / 2},
}


def device_peak_flops(device: jax.Device, dtype: str) -> float | None:
    """Peak FLOP/s for `device` at `dtype`, or None for devices we have no number for (CPUs)."""
    kind = getattr(device, "device_kind", "") or ""
    # Longest match first: "TPU v5 lite" must not be taken for "TPU v5p" etc.
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            table = PEAK_FLOPS[name]
            return table.get(dtype, table.get("float32"))
    return None


def mfu(flops_per_step: float | None, step_seconds: float, num_devices: int, peak: float | None) -> float | None:
    """Achieved / peak FLOP/s. Under SPMD `flops_per_step` is per device program, so the
    achieved rate is compared with one device's peak."""
    if not flops_per_step or not peak or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / peak


def memory_stats(device: jax.Device | None = None) -> dict[str, float]:
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:
        stats = {}
    return {k: float(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


def compiled_memory(compiled) -> dict[str, float]:
    """XLA's static memory plan for one executable (works on CPU too)."""
    try:
        m = compiled.memory_analysis()
    except Exception:
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    return {k: float(getattr(m, k)) for k in keys if hasattr(m, k)}


def profile_training(trainer, num_steps: int | None = None) -> dict[str, float]:
    """Compile `trainer`'s step, time a few steps under jax.profiler (the trace goes to
    <run_dir>/profile), report FLOPs, FLOP/s, MFU and memory."""
    n = num_steps or trainer.cfg.profile_steps
    it = trainer.train_iterator()
    batch = mesh_lib.global_batch_from_local(next(it), trainer.mesh)
    compiled = trainer.compile_step(batch)
    trainer.state, m = compiled(trainer.state, batch, trainer.rng)
    jax.block_until_ready(m["loss"])
    trace_dir = trainer.run_dir / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)
    times = []
    with jax.profiler.trace(str(trace_dir)):
        for _ in range(n):
            batch = mesh_lib.global_batch_from_local(next(it), trainer.mesh)
            t0 = time.perf_counter()
            trainer.state, m = compiled(trainer.state, batch, trainer.rng)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
    step_time = float(np.median(times))
    dev = jax.devices()[0]
    peak = device_peak_flops(dev, trainer.model_cfg.dtype)
    report = {
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')} x{trainer.mesh.size}",
        "step_time_s": step_time,
        "img_per_s": trainer.cfg.batch_size / step_time,
        "flops_per_step_per_device": trainer.flops_per_step,
        "achieved_tflops_per_device": (trainer.flops_per_step / step_time / 1e12) if trainer.flops_per_step else None,
        "mfu": mfu(trainer.flops_per_step, step_time, trainer.mesh.size, peak),
        **{f"mem/{k}": v for k, v in compiled_memory(compiled).items()},
        **{f"mem/device_{k}": v for k, v in memory_stats(dev).items()},
        "trace_dir": str(trace_dir),
    }
    return report
