"""oneDNN kernels inside XLA:CPU programs: XLA FFI custom calls, compiled on first use.

- `matmul`: the attention matmuls of the XLA attention path on single-device CPU runs, and the
  primitive behind `dense_backward` (the dense forward is `linear`, below). Why: XLA:CPU
  gives bf16 dots AMX-class speed only in two operand layouts (weight gradients and half of
  attention's backward are upcast to fp32 Eigen dots, ~200 GFLOP/s), and its batched attention
  matmuls reach 100-180 GFLOP/s. oneDNN's matmul primitive takes every layout through strides and
  runs bf16 on AMX. Measured on the 2-core Xeon (jemalloc, `a @ b` at DiT-S/2 b32 shapes): bf16
  weight gradient 1100-1400 GFLOP/s against 210-220 for XLA's transposed dot; attention's q @ k^T
  2.5x XLA in fp32 and bf16; fp32 dense matmuls 1.0-1.2x.
- `linear`, `linear_gelu` / `gelu_backward`: linear layers with the bias in the call and the result
  in the operands' dtype (bf16 activations between layers), and the MLP's first layer with its GELU
  (see onednn_kernels.cc for why and what it saves); `dense_backward`: a dense layer's dx, dW and
  db in one call (as three, XLA ran them concurrently and they competed for the cores).
- `attention_forward` / `attention_backward`: softmax attention fused per head (logits, softmax
  and both matmuls in cache; the backward recomputes the probabilities), on (B, L, H, D) operands
  so no transposes surround it. DiT-S/2 b32 shapes, forward+backward: bf16 33 -> 24 ms, fp32 62
  -> 53 ms against the same attention as separate oneDNN matmuls and XLA softmax
  (`python -m benchmarks.bench_attention`). `attention_packed_forward` / `_backward`: the same on
  the packed (B, L, 3, H, D) projection, read and written in place (DiT's self-attention);
  `attention_joint_forward` / `_backward`: MMDiT's joint attention over two streams, unconcatenated.
- `adaln_forward` / `adaln_backward`, `rms_norm_forward` / `rms_norm_backward` (QK-norm),
  `gated_residual_backward`, `column_sum`: memory-bound row
  passes (row_kernels.cc) where XLA:CPU made several passes or reduced on one thread.

The kernels are `onednn_kernels.cc` and `attention_kernels.cc` (oneDNN) and `row_kernels.cc`
(plain C++/OpenMP: adaLN, QK-norm, column sum, gated residual), built with the system C++ compiler
against Debian's libdnnl-dev (`make setup` installs it) into a cache directory, once per source/jaxlib version.
Where they cannot be built, models fall back to XLA (same results, slower) after a one-line
warning. MMDIT_ONEDNN selects: "auto" (default: single-device CPU runs, when it builds), "on"
(also on multi-device CPU meshes, where XLA replicates the call; fail if it cannot build), "off".
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ENV = "MMDIT_ONEDNN"
CACHE_ENV = "MMDIT_CACHE_DIR"
_DIR = Path(__file__).parent
SOURCES = (_DIR / "onednn_kernels.cc", _DIR / "attention_kernels.cc", _DIR / "row_kernels.cc")
HEADERS = (_DIR / "common.h", _DIR / "onednn_common.h")
TARGET = "mmdit_onednn_matmul"
ATTENTION_FWD = "mmdit_onednn_attention_fwd"
ATTENTION_BWD = "mmdit_onednn_attention_bwd"
LINEAR = "mmdit_onednn_linear"
LINEAR_GELU = "mmdit_onednn_linear_gelu"
GELU_BWD = "mmdit_onednn_gelu_bwd"
ADALN_FWD = "mmdit_adaln_fwd"
ADALN_BWD = "mmdit_adaln_bwd"
COLUMN_SUM = "mmdit_column_sum"
DENSE_BWD = "mmdit_dense_bwd"
ATTENTION_PACKED_FWD = "mmdit_onednn_attention_packed_fwd"
ATTENTION_PACKED_BWD = "mmdit_onednn_attention_packed_bwd"
GATED_RESIDUAL_BWD = "mmdit_gated_residual_bwd"
ATTENTION_JOINT_FWD = "mmdit_onednn_attention_joint_fwd"
ATTENTION_JOINT_BWD = "mmdit_onednn_attention_joint_bwd"
RMS_NORM_FWD = "mmdit_rms_norm_fwd"
RMS_NORM_BWD = "mmdit_rms_norm_bwd"
# Each custom-call target and the C symbol of its FFI handler in the built library.
_HANDLERS = {TARGET: "MmditOnednnMatmul", ATTENTION_FWD: "MmditOnednnAttentionFwd",
             ATTENTION_BWD: "MmditOnednnAttentionBwd", LINEAR: "MmditOnednnLinear",
             LINEAR_GELU: "MmditOnednnLinearGelu", GELU_BWD: "MmditOnednnGeluBwd", ADALN_FWD: "MmditAdaLnFwd",
             ADALN_BWD: "MmditAdaLnBwd", COLUMN_SUM: "MmditColumnSum", DENSE_BWD: "MmditDenseBwd",
             ATTENTION_PACKED_FWD: "MmditOnednnAttentionPackedFwd",
             ATTENTION_PACKED_BWD: "MmditOnednnAttentionPackedBwd", GATED_RESIDUAL_BWD: "MmditGatedResidualBwd",
             RMS_NORM_FWD: "MmditRmsNormFwd", RMS_NORM_BWD: "MmditRmsNormBwd",
             ATTENTION_JOINT_FWD: "MmditOnednnAttentionJointFwd",
             ATTENTION_JOINT_BWD: "MmditOnednnAttentionJointBwd"}
TARGETS = tuple(_HANDLERS)


def _mode() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{ENV} must be auto, on or off, got {mode!r}")
    return mode


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "jax_mmdit")
    return Path(root)


def _library_path() -> Path:
    # A new kernel source or jaxlib (FFI headers) gets its own file: stale builds are never loaded.
    key = hashlib.sha256(b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS)) + jax.lib.__version__.encode()).hexdigest()[:16]
    return _cache_dir() / f"onednn_kernels-{key}.so"


def build() -> Path:
    """Compile the kernel if this source/jaxlib has no build yet; returns the shared library.
    Raises RuntimeError with the compiler's message when it cannot be built."""
    path = _library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    # Written to a temporary name and renamed: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    cmd = [cxx, "-O2", "-shared", "-fPIC", "-fopenmp", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}",
           *map(str, SOURCES), "-o", tmp, "-ldnnl"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as e:
        os.unlink(tmp)
        raise RuntimeError(f"no C++ compiler ({cxx}): {e}") from None
    if proc.returncode != 0:
        os.unlink(tmp)
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln] or proc.stderr.splitlines()[-1:]
        raise RuntimeError(f"{' '.join(cmd[:1])} failed: {lines[0] if lines else proc.returncode}")
    os.replace(tmp, path)
    return path


@functools.cache
def _load() -> str | None:
    """Builds (if needed), loads and registers the custom call once per process; the reason it is
    unavailable, or None when it is ready."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        return str(e)
    for target, symbol in _HANDLERS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return None


def enabled() -> bool:
    """Should this trace use oneDNN matmuls? Decided at trace time (jit caches the answer)."""
    mode = _mode()
    if mode == "off" or jax.default_backend() != "cpu":
        return False
    if mode == "auto" and jax.device_count() != 1:
        # No sharding rule for the custom call: XLA would gather and replicate it on a mesh.
        return False
    reason = _load()
    if reason is None:
        return True
    if mode == "on":
        raise RuntimeError(f"{ENV}=on but the oneDNN kernel is unavailable: {reason}")
    _warn_once(reason)
    return False


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"oneDNN matmuls unavailable ({reason}); using XLA's dots, slower on CPU. "
        f"Install g++ and libdnnl-dev (make setup does), or set {ENV}=off to silence this.",
        stacklevel=3,
    )


def matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False,
           out_dtype=jnp.float32) -> jax.Array:
    """op(a) @ op(b), op transposing the last two axes when asked (a stride, no copy).
    a: (..., M, K); b: (K, N) or batched like a. Both float32 or both bfloat16. The result is
    float32 (`out_dtype`), or the operands' dtype, rounded once from float32 accumulators."""
    if a.dtype != b.dtype or a.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"onednn.matmul takes two float32 or two bfloat16 operands, got {a.dtype}, {b.dtype}")
    if jnp.dtype(out_dtype) not in (jnp.float32, a.dtype):
        raise TypeError(f"onednn.matmul returns float32 or the operands' dtype {a.dtype}, not {out_dtype}")
    M = a.shape[-1] if transpose_a else a.shape[-2]
    K = a.shape[-2] if transpose_a else a.shape[-1]
    Kb, N = (b.shape[-1], b.shape[-2]) if transpose_b else (b.shape[-2], b.shape[-1])
    if K != Kb or (b.ndim != 2 and b.shape[:-2] != a.shape[:-2]):
        raise ValueError(f"onednn.matmul: cannot multiply {a.shape} (T={transpose_a}) by {b.shape} (T={transpose_b})")
    out = jax.ShapeDtypeStruct((*a.shape[:-2], M, N), out_dtype)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        a, b, transpose_a=transpose_a, transpose_b=transpose_b
    )


def _check_attention(q, k, v):
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"onednn attention takes float32 or bfloat16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or (q.shape[0], *q.shape[2:]) != (k.shape[0], *k.shape[2:]):
        raise ValueError(f"onednn attention wants q (B, L, H, D), k and v (B, S, H, D); got {q.shape}, {k.shape}, {v.shape}")


def attention_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for q (B, L, H, D), k and v (B, S, H, D) -> (B, L, H, D), one
    kernel per call (logits stay in cache, float32). float32 or bfloat16, all alike."""
    _check_attention(q, k, v)
    return jax.ffi.ffi_call(ATTENTION_FWD, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")(q, k, v)


def attention_backward(q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of `attention_forward` for the output cotangent `do` (like q); recomputes the
    probabilities from q and k instead of keeping them from the forward."""
    _check_attention(q, k, v)
    if do.shape != q.shape or do.dtype != q.dtype:
        raise ValueError(f"onednn attention backward: do must be like q {q.shape} {q.dtype}, got {do.shape} {do.dtype}")
    out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))
    return jax.ffi.ffi_call(ATTENTION_BWD, out, vmap_method="sequential")(q, k, v, do)



def _check_packed(qkv: jax.Array) -> None:
    if qkv.ndim != 5 or qkv.shape[2] != 3 or qkv.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"onednn packed attention wants qkv (B, L, 3, H, D) in float32 or bfloat16, got {qkv.shape} {qkv.dtype}")


def attention_packed_forward(qkv: jax.Array) -> jax.Array:
    """`attention_forward` of q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], read in place from
    the packed (B, L, 3, H, D) projection (no split copies) -> (B, L, H, D)."""
    _check_packed(qkv)
    B, L, _, H, D = qkv.shape
    return jax.ffi.ffi_call(ATTENTION_PACKED_FWD, jax.ShapeDtypeStruct((B, L, H, D), qkv.dtype),
                            vmap_method="sequential")(qkv)


def attention_packed_backward(qkv: jax.Array, do: jax.Array) -> jax.Array:
    """The gradient of `attention_packed_forward` for the output cotangent `do` (B, L, H, D), packed
    like qkv (dq, dk, dv in slots 0, 1, 2: no concatenate)."""
    _check_packed(qkv)
    B, L, _, H, D = qkv.shape
    if do.shape != (B, L, H, D) or do.dtype != qkv.dtype:
        raise ValueError(f"onednn packed attention backward: do must be {(B, L, H, D)} {qkv.dtype}, got {do.shape} {do.dtype}")
    return jax.ffi.ffi_call(ATTENTION_PACKED_BWD, jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
                            vmap_method="sequential")(qkv, do)


def _check_joint(x_qkv, c_qkv) -> None:
    for a in (*x_qkv, *c_qkv):
        if a.ndim != 4 or a.dtype != x_qkv[0].dtype or a.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError("onednn joint attention wants q, k, v of both streams as (B, L, H, D) arrays of one "
                             f"float32/bfloat16 dtype; got {[(t.shape, str(t.dtype)) for t in (*x_qkv, *c_qkv)]}")
    for qkv in (x_qkv, c_qkv):
        if not qkv[0].shape == qkv[1].shape == qkv[2].shape:
            raise ValueError(f"onednn joint attention: q, k, v of a stream differ: {[t.shape for t in qkv]}")
    (B, _, H, D), (B2, _, H2, D2) = x_qkv[0].shape, c_qkv[0].shape
    if (B, H, D) != (B2, H2, D2):
        raise ValueError(f"onednn joint attention: the streams differ in batch, heads or head size: {x_qkv[0].shape}, {c_qkv[0].shape}")


def attention_joint_forward(x_qkv: tuple, c_qkv: tuple) -> tuple[jax.Array, jax.Array]:
    """`attention_forward` over the concatenation of two streams' tokens (image (B, L, H, D) first,
    then context (B, T, H, D)), without concatenating them: -> (o_x, o_c) per stream."""
    _check_joint(x_qkv, c_qkv)
    out = (jax.ShapeDtypeStruct(x_qkv[0].shape, x_qkv[0].dtype), jax.ShapeDtypeStruct(c_qkv[0].shape, c_qkv[0].dtype))
    return jax.ffi.ffi_call(ATTENTION_JOINT_FWD, out, vmap_method="sequential")(*x_qkv, *c_qkv)


def attention_joint_backward(x_qkv: tuple, c_qkv: tuple, do_x: jax.Array, do_c: jax.Array) -> tuple[tuple, tuple]:
    """((dq, dk, dv) of the image stream, (dq, dk, dv) of the context stream) of
    `attention_joint_forward` for the output cotangents do_x, do_c (like each stream's q)."""
    _check_joint(x_qkv, c_qkv)
    if do_x.shape != x_qkv[0].shape or do_c.shape != c_qkv[0].shape or not do_x.dtype == do_c.dtype == x_qkv[0].dtype:
        raise ValueError(f"onednn joint attention backward: do of each stream must be like its q; got {do_x.shape}, {do_c.shape}")
    out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*x_qkv, *c_qkv))
    grads = jax.ffi.ffi_call(ATTENTION_JOINT_BWD, out, vmap_method="sequential")(*x_qkv, *c_qkv, do_x, do_c)
    return tuple(grads[:3]), tuple(grads[3:])

def _check_linear(name: str, x: jax.Array, w: jax.Array, b: jax.Array) -> jax.ShapeDtypeStruct:
    if x.dtype != w.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"onednn.{name} takes float32 or bfloat16 x and w of one dtype, got {x.dtype}, {w.dtype}")
    if x.ndim != 2 or w.ndim != 2 or b.shape != (w.shape[1],) or x.shape[1] != w.shape[0]:
        raise ValueError(f"onednn.{name} wants x (M, K), w (K, N), b (N,); got {x.shape}, {w.shape}, {b.shape}")
    return jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)


def linear(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """x @ w + b in x's dtype: x (M, K) and w (K, N) both float32 or both bfloat16, b (N,) float32
    (accumulation is float32; bf16 results are rounded once, at the end)."""
    out = _check_linear("linear", x, w, b)
    return jax.ffi.ffi_call(LINEAR, out, vmap_method="sequential")(x, w, b.astype(jnp.float32))


def linear_gelu(x: jax.Array, w: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(z, GELU_tanh(z)) for z = `linear`(x, w, b), both in x's dtype, from one call."""
    out = _check_linear("linear_gelu", x, w, b)
    return jax.ffi.ffi_call(LINEAR_GELU, (out, out), vmap_method="sequential")(x, w, b.astype(jnp.float32))


def gelu_backward(z: jax.Array, g: jax.Array) -> jax.Array:
    """GELU_tanh'(z) * g in z's dtype (float32 or bfloat16; g alike)."""
    if z.shape != g.shape or z.dtype != g.dtype or z.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"onednn.gelu_backward wants z and g of one shape and dtype (float32/bfloat16); got "
                         f"{z.shape} {z.dtype}, {g.shape} {g.dtype}")
    return jax.ffi.ffi_call(GELU_BWD, jax.ShapeDtypeStruct(z.shape, z.dtype), vmap_method="sequential")(z, g)


def column_sum(z: jax.Array) -> jax.Array:
    """z.sum(0) in float32 for z (M, N) float32 or bfloat16 (a dense layer's bias gradient), one
    read of z."""
    if z.ndim != 2 or z.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"onednn.column_sum wants a float32 or bfloat16 (M, N) array, got {z.shape} {z.dtype}")
    return jax.ffi.ffi_call(COLUMN_SUM, jax.ShapeDtypeStruct(z.shape[1:], jnp.float32), vmap_method="sequential")(z)


def _check_adaln(name: str, x: jax.Array, scale: jax.Array) -> None:
    if x.dtype != jnp.float32 or scale.dtype != jnp.float32:
        raise TypeError(f"onednn.{name} takes float32 x and scale, got {x.dtype}, {scale.dtype}")
    if x.ndim != 3 or scale.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"onednn.{name} wants x (B, L, D) and scale (B, D); got {x.shape}, {scale.shape}")


def adaln_forward(x: jax.Array, shift: jax.Array, scale: jax.Array, out_dtype, eps: float) -> jax.Array:
    """LayerNorm(x) * (1 + scale) + shift in `out_dtype` (float32 or bfloat16; computed in float32),
    for x (B, L, D) and per-sample shift, scale (B, D), all float32. One pass over x."""
    _check_adaln("adaln_forward", x, scale)
    if shift.shape != scale.shape or shift.dtype != jnp.float32:
        raise ValueError(f"onednn.adaln_forward: shift must be like scale {scale.shape} float32, got {shift.shape} {shift.dtype}")
    if jnp.dtype(out_dtype) not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"onednn.adaln_forward returns float32 or bfloat16, not {out_dtype}")
    out = jax.ShapeDtypeStruct(x.shape, out_dtype)
    return jax.ffi.ffi_call(ADALN_FWD, out, vmap_method="sequential")(x, shift, scale, eps=np.float32(eps))


def adaln_backward(x: jax.Array, scale: jax.Array, dh: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dx, dshift, dscale) of `adaln_forward` for the cotangent dh (like x, float32 or bfloat16),
    all float32; recomputes the row statistics from x."""
    _check_adaln("adaln_backward", x, scale)
    if dh.shape != x.shape or dh.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"onednn.adaln_backward: dh must be like x {x.shape} (float32/bfloat16), got {dh.shape} {dh.dtype}")
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(scale.shape, jnp.float32),
           jax.ShapeDtypeStruct(scale.shape, jnp.float32))
    return jax.ffi.ffi_call(ADALN_BWD, out, vmap_method="sequential")(x, scale, dh, eps=np.float32(eps))



def gated_residual_backward(gate: jax.Array, a: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(da, dgate) of y = x + gate[:, None, :] * a for the cotangent dy: da = gate * dy in a's dtype,
    dgate = sum over L of dy * a in float32, from one pass. gate (B, D) and dy (B, L, D) float32,
    a (B, L, D) float32 or bfloat16."""
    if gate.dtype != jnp.float32 or dy.dtype != jnp.float32 or a.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"onednn.gated_residual_backward takes float32 gate and dy and a float32/bfloat16 a, got {gate.dtype}, {a.dtype}, {dy.dtype}")
    if a.ndim != 3 or dy.shape != a.shape or gate.shape != (a.shape[0], a.shape[2]):
        raise ValueError(f"onednn.gated_residual_backward wants gate (B, D), a and dy (B, L, D); got {gate.shape}, {a.shape}, {dy.shape}")
    out = (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(gate.shape, jnp.float32))
    return jax.ffi.ffi_call(GATED_RESIDUAL_BWD, out, vmap_method="sequential")(gate, a, dy)


def _check_rms(name: str, x: jax.Array, scale: jax.Array) -> None:
    if x.ndim != 2 or x.dtype not in (jnp.float32, jnp.bfloat16) or scale.shape != x.shape[1:] or scale.dtype != jnp.float32:
        raise ValueError(f"onednn.{name} wants x (rows, D) float32/bfloat16 and a float32 scale (D,); got {x.shape} {x.dtype}, {scale.shape} {scale.dtype}")


def rms_norm_forward(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, in x's dtype (float32 statistics)."""
    _check_rms("rms_norm_forward", x, scale)
    return jax.ffi.ffi_call(RMS_NORM_FWD, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")(
        x, scale, eps=np.float32(eps))


def rms_norm_backward(x: jax.Array, scale: jax.Array, dy: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(dx in x's dtype, dscale float32) of `rms_norm_forward` for the cotangent dy (like x)."""
    _check_rms("rms_norm_backward", x, scale)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"onednn.rms_norm_backward: dy must be like x {x.shape} {x.dtype}, got {dy.shape} {dy.dtype}")
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(scale.shape, jnp.float32))
    return jax.ffi.ffi_call(RMS_NORM_BWD, out, vmap_method="sequential")(x, scale, dy, eps=np.float32(eps))

# Output shape, then the first operand's shape: inline in the call, or (compiled HLO) in the
# operand layout constraints.
_OUT = re.compile(r"=\s*b?f(?:16|32)\[([\d,]*)\]\S*\s+custom-call\(")
_A = re.compile(r"(?:custom-call\(|operand_layout_constraints=\{)\s*\w+\[([\d,]*)\]")


_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
# Model FLOPs per B*H*L*S*D of the attention kernels: two matmuls forward, four backward (the
# backward's recomputed q k^T is not counted, as MFU conventions leave recomputation out).
_ATTENTION_FLOPS = {ATTENTION_FWD: 4.0, ATTENTION_BWD: 8.0, ATTENTION_PACKED_FWD: 4.0, ATTENTION_PACKED_BWD: 8.0,
                    ATTENTION_JOINT_FWD: 4.0, ATTENTION_JOINT_BWD: 8.0}
# Matmul FLOPs per M*K*N of the dense-layer kernels (x (M, K), w (K, N)): the forward's matmul, the
# backward's two (dx, dW; the bias gradient's column sum and the GELU are not matmul FLOPs).
_DENSE_FLOPS = {LINEAR: 2.0, LINEAR_GELU: 2.0, DENSE_BWD: 4.0}
# Rank of the first two operands' shapes each kernel's count reads.
_RANKS = {**{t: (2, 2) for t in _DENSE_FLOPS}, ATTENTION_FWD: (4, 4), ATTENTION_BWD: (4, 4),
          ATTENTION_PACKED_FWD: (5,), ATTENTION_PACKED_BWD: (5, 4), ATTENTION_JOINT_FWD: (4, 4, 4, 4),
          ATTENTION_JOINT_BWD: (4, 4, 4, 4)}


def kernel_calls(hlo_text: str) -> set[str]:
    """The custom-call targets of this module that compiled HLO text calls (empty: XLA's own ops ran)."""
    return {t for t in TARGETS if f'custom_call_target="{t}"' in hlo_text}


def hlo_flops(hlo_text: str) -> float:
    """FLOPs of this module's kernel calls in compiled HLO text: XLA's cost analysis counts a custom
    call as zero, which would make FLOP/s and MFU figures miss every matmul. Matmul: 2*M*N*K per
    call (per batch element), K = size(a) / (batch*M) whichever way a is transposed. Dense layers:
    _DENSE_FLOPS from x (M, K) and w (K, N). Attention: _ATTENTION_FLOPS from q (B, L, H, D) and
    k (B, S, H, D), the packed qkv (B, L, 3, H, D), or two streams' q (B, L, H, D), (B, T, H, D)."""
    total = 0.0
    for line in hlo_text.splitlines():
        target = next((t for t in (TARGET, *_RANKS) if f'custom_call_target="{t}"' in line), None)
        if target is None:
            continue
        if target != TARGET:
            # The first operands' shapes in the operand layout constraints.
            _, _, operands = line.partition("operand_layout_constraints={")
            ranks = _RANKS[target]
            shapes = [[int(d) for d in m.group(1).split(",") if d] for m in _SHAPE.finditer(operands)][: len(ranks)]
            if tuple(len(shape) for shape in shapes) != ranks:
                raise ValueError(f"unparsed {target} call in HLO: {line.strip()[:200]}")
            if target in _DENSE_FLOPS:
                (M, K), N = shapes[0], shapes[1][1]
                total += _DENSE_FLOPS[target] * M * K * N
            elif target in (ATTENTION_JOINT_FWD, ATTENTION_JOINT_BWD):  # qx, kx, vx, qc: L + T tokens
                (B, L, H, D), T = shapes[0], shapes[3][1]
                total += _ATTENTION_FLOPS[target] * B * H * (L + T) ** 2 * D
            elif len(ranks) == 2 and ranks[0] == 4:
                (B, L, H, D), S = shapes[0], shapes[1][1]
                total += _ATTENTION_FLOPS[target] * B * H * L * S * D
            else:
                B, L, _, H, D = shapes[0]
                total += _ATTENTION_FLOPS[target] * B * H * L * L * D
            continue
        m_out, m_a = _OUT.search(line), _A.search(line)
        if m_out is None or m_a is None:
            raise ValueError(f"unparsed {TARGET} call in HLO: {line.strip()[:200]}")
        out = [int(d) for d in m_out.group(1).split(",") if d]
        a = [int(d) for d in m_a.group(1).split(",") if d]
        rows = math.prod(out[:-1])
        total += 2.0 * math.prod(out) * (math.prod(a) / rows)
    return total


def dense_backward(x: jax.Array, w: jax.Array, dz: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients of x @ w + b for the output cotangent dz, in one call: dx = dz w^T in x's
    dtype, dW = x^T dz and db = dz summed over rows, both float32. x (M, K), w (K, N) and dz (M, N)
    share one dtype, float32 or bfloat16."""
    if not (x.dtype == w.dtype == dz.dtype) or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"onednn.dense_backward takes float32 or bfloat16 x, w, dz of one dtype, got {x.dtype}, {w.dtype}, {dz.dtype}")
    if x.ndim != 2 or w.ndim != 2 or dz.shape != (x.shape[0], w.shape[1]) or x.shape[1] != w.shape[0]:
        raise ValueError(f"onednn.dense_backward wants x (M, K), w (K, N), dz (M, N); got {x.shape}, {w.shape}, {dz.shape}")
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, jnp.float32),
           jax.ShapeDtypeStruct(w.shape[1:], jnp.float32))
    return jax.ffi.ffi_call(DENSE_BWD, out, vmap_method="sequential")(x, w, dz)
