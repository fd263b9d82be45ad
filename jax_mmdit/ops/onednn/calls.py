"""The kernels as JAX functions: one `jax.ffi.ffi_call` each, with its operand checks.

- `linear`, `linear_gelu` / `gelu_backward`: dense layers with the bias in the call and the result
  in the operands' dtype (bf16 activations between layers), and the MLP's first layer with its GELU;
  `dense_backward`: a dense layer's dx, dW and db in one call (onednn_kernels.cc says why).
- `matmul`: a (batched) matmul whose transposes are strides; attention's matmuls where attention
  runs as separate matmuls (`attention="xla"`, or with a mask).
- `attention_forward` / `_backward`: softmax attention fused per head (logits, softmax and both
  matmuls in cache; the backward recomputes the probabilities) on (B, L, H, D) operands;
  `attention_packed_*`: the same on the packed (B, L, 3, H, D) projection, read and written in
  place; `attention_joint_*`: MMDiT's joint attention over two streams, unconcatenated
  (attention_kernels.cc).
- `adaln_*`, `rms_norm_*`, `gated_residual_backward`: memory-bound row passes (row_kernels.cc)
  where XLA:CPU made several passes or reduced on one thread.

Every function here needs the library loaded (`build.load(HANDLERS)`); `OnednnOps` does that when
it is resolved, before any trace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MATMUL = "mmdit_onednn_matmul"
ATTENTION_FWD = "mmdit_onednn_attention_fwd"
ATTENTION_BWD = "mmdit_onednn_attention_bwd"
LINEAR = "mmdit_onednn_linear"
LINEAR_GELU = "mmdit_onednn_linear_gelu"
GELU_BWD = "mmdit_onednn_gelu_bwd"
ADALN_FWD = "mmdit_adaln_fwd"
ADALN_BWD = "mmdit_adaln_bwd"
DENSE_BWD = "mmdit_dense_bwd"
ATTENTION_PACKED_FWD = "mmdit_onednn_attention_packed_fwd"
ATTENTION_PACKED_BWD = "mmdit_onednn_attention_packed_bwd"
GATED_RESIDUAL_BWD = "mmdit_gated_residual_bwd"
ATTENTION_JOINT_FWD = "mmdit_onednn_attention_joint_fwd"
ATTENTION_JOINT_BWD = "mmdit_onednn_attention_joint_bwd"
RMS_NORM_FWD = "mmdit_rms_norm_fwd"
RMS_NORM_BWD = "mmdit_rms_norm_bwd"
# Each custom-call target and the C symbol of its FFI handler in the built library.
HANDLERS = (
    (MATMUL, "MmditOnednnMatmul"),
    (ATTENTION_FWD, "MmditOnednnAttentionFwd"),
    (ATTENTION_BWD, "MmditOnednnAttentionBwd"),
    (LINEAR, "MmditOnednnLinear"),
    (LINEAR_GELU, "MmditOnednnLinearGelu"),
    (GELU_BWD, "MmditOnednnGeluBwd"),
    (ADALN_FWD, "MmditAdaLnFwd"),
    (ADALN_BWD, "MmditAdaLnBwd"),
    (DENSE_BWD, "MmditDenseBwd"),
    (ATTENTION_PACKED_FWD, "MmditOnednnAttentionPackedFwd"),
    (ATTENTION_PACKED_BWD, "MmditOnednnAttentionPackedBwd"),
    (GATED_RESIDUAL_BWD, "MmditGatedResidualBwd"),
    (RMS_NORM_FWD, "MmditRmsNormFwd"),
    (RMS_NORM_BWD, "MmditRmsNormBwd"),
    (ATTENTION_JOINT_FWD, "MmditOnednnAttentionJointFwd"),
    (ATTENTION_JOINT_BWD, "MmditOnednnAttentionJointBwd"),
)
TARGETS = tuple(t for t, _ in HANDLERS)


def matmul(
    a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False, out_dtype=jnp.float32
) -> jax.Array:
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
    return jax.ffi.ffi_call(MATMUL, out, vmap_method="sequential")(
        a, b, transpose_a=transpose_a, transpose_b=transpose_b
    )


def _check_attention(q, k, v):
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(
            f"onednn attention takes float32 or bfloat16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or (q.shape[0], *q.shape[2:]) != (k.shape[0], *k.shape[2:]):
        raise ValueError(
            f"onednn attention wants q (B, L, H, D), k and v (B, S, H, D); got {q.shape}, {k.shape}, {v.shape}"
        )


def attention_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v for q (B, L, H, D), k and v (B, S, H, D) -> (B, L, H, D), one
    kernel per call (logits stay in cache, float32). float32 or bfloat16, all alike."""
    _check_attention(q, k, v)
    return jax.ffi.ffi_call(ATTENTION_FWD, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")(q, k, v)


def attention_backward(
    q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dq, dk, dv) of `attention_forward` for the output cotangent `do` (like q); recomputes the
    probabilities from q and k instead of keeping them from the forward."""
    _check_attention(q, k, v)
    if do.shape != q.shape or do.dtype != q.dtype:
        raise ValueError(f"onednn attention backward: do must be like q {q.shape} {q.dtype}, got {do.shape} {do.dtype}")
    out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))
    return jax.ffi.ffi_call(ATTENTION_BWD, out, vmap_method="sequential")(q, k, v, do)


def _check_packed(qkv: jax.Array) -> None:
    if qkv.ndim != 5 or qkv.shape[2] != 3 or qkv.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(
            f"onednn packed attention wants qkv (B, L, 3, H, D) in float32 or bfloat16, got {qkv.shape} {qkv.dtype}"
        )


def attention_packed_forward(qkv: jax.Array) -> jax.Array:
    """`attention_forward` of q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], read in place from
    the packed (B, L, 3, H, D) projection (no split copies) -> (B, L, H, D)."""
    _check_packed(qkv)
    B, L, _, H, D = qkv.shape
    return jax.ffi.ffi_call(
        ATTENTION_PACKED_FWD, jax.ShapeDtypeStruct((B, L, H, D), qkv.dtype), vmap_method="sequential"
    )(qkv)


def attention_packed_backward(qkv: jax.Array, do: jax.Array) -> jax.Array:
    """The gradient of `attention_packed_forward` for the output cotangent `do` (B, L, H, D), packed
    like qkv (dq, dk, dv in slots 0, 1, 2: no concatenate)."""
    _check_packed(qkv)
    B, L, _, H, D = qkv.shape
    if do.shape != (B, L, H, D) or do.dtype != qkv.dtype:
        raise ValueError(
            f"onednn packed attention backward: do must be {(B, L, H, D)} {qkv.dtype}, got {do.shape} {do.dtype}"
        )
    return jax.ffi.ffi_call(ATTENTION_PACKED_BWD, jax.ShapeDtypeStruct(qkv.shape, qkv.dtype), vmap_method="sequential")(
        qkv, do
    )


def _check_joint(x_qkv, c_qkv) -> None:
    for a in (*x_qkv, *c_qkv):
        if a.ndim != 4 or a.dtype != x_qkv[0].dtype or a.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(
                "onednn joint attention wants q, k, v of both streams as (B, L, H, D) arrays of one "
                f"float32/bfloat16 dtype; got {[(t.shape, str(t.dtype)) for t in (*x_qkv, *c_qkv)]}"
            )
    for qkv in (x_qkv, c_qkv):
        if not qkv[0].shape == qkv[1].shape == qkv[2].shape:
            raise ValueError(f"onednn joint attention: q, k, v of a stream differ: {[t.shape for t in qkv]}")
    (B, _, H, D), (B2, _, H2, D2) = x_qkv[0].shape, c_qkv[0].shape
    if (B, H, D) != (B2, H2, D2):
        raise ValueError(
            "onednn joint attention: the streams differ in batch, heads or head size: "
            f"{x_qkv[0].shape}, {c_qkv[0].shape}"
        )


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
        raise ValueError(
            f"onednn joint attention backward: do of each stream must be like its q; got {do_x.shape}, {do_c.shape}"
        )
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
        raise ValueError(
            f"onednn.gelu_backward wants z and g of one shape and dtype (float32/bfloat16); got "
            f"{z.shape} {z.dtype}, {g.shape} {g.dtype}"
        )
    return jax.ffi.ffi_call(GELU_BWD, jax.ShapeDtypeStruct(z.shape, z.dtype), vmap_method="sequential")(z, g)


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
        raise ValueError(
            f"onednn.adaln_forward: shift must be like scale {scale.shape} float32, got {shift.shape} {shift.dtype}"
        )
    if jnp.dtype(out_dtype) not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"onednn.adaln_forward returns float32 or bfloat16, not {out_dtype}")
    out = jax.ShapeDtypeStruct(x.shape, out_dtype)
    return jax.ffi.ffi_call(ADALN_FWD, out, vmap_method="sequential")(x, shift, scale, eps=np.float32(eps))


def adaln_backward(x: jax.Array, scale: jax.Array, dh: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(dx, dshift, dscale) of `adaln_forward` for the cotangent dh (like x, float32 or bfloat16),
    all float32; recomputes the row statistics from x."""
    _check_adaln("adaln_backward", x, scale)
    if dh.shape != x.shape or dh.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(
            f"onednn.adaln_backward: dh must be like x {x.shape} (float32/bfloat16), got {dh.shape} {dh.dtype}"
        )
    out = (
        jax.ShapeDtypeStruct(x.shape, jnp.float32),
        jax.ShapeDtypeStruct(scale.shape, jnp.float32),
        jax.ShapeDtypeStruct(scale.shape, jnp.float32),
    )
    return jax.ffi.ffi_call(ADALN_BWD, out, vmap_method="sequential")(x, scale, dh, eps=np.float32(eps))


def gated_residual_backward(gate: jax.Array, a: jax.Array, dy: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(da, dgate) of y = x + gate[:, None, :] * a for the cotangent dy: da = gate * dy in a's dtype,
    dgate = sum over L of dy * a in float32, from one pass. gate (B, D) and dy (B, L, D) float32,
    a (B, L, D) float32 or bfloat16."""
    if gate.dtype != jnp.float32 or dy.dtype != jnp.float32 or a.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(
            "onednn.gated_residual_backward takes float32 gate and dy and a float32/bfloat16 a, "
            f"got {gate.dtype}, {a.dtype}, {dy.dtype}"
        )
    if a.ndim != 3 or dy.shape != a.shape or gate.shape != (a.shape[0], a.shape[2]):
        raise ValueError(
            "onednn.gated_residual_backward wants gate (B, D), a and dy (B, L, D); "
            f"got {gate.shape}, {a.shape}, {dy.shape}"
        )
    out = (jax.ShapeDtypeStruct(a.shape, a.dtype), jax.ShapeDtypeStruct(gate.shape, jnp.float32))
    return jax.ffi.ffi_call(GATED_RESIDUAL_BWD, out, vmap_method="sequential")(gate, a, dy)


def _check_rms(name: str, x: jax.Array, scale: jax.Array) -> None:
    if (
        x.ndim != 2
        or x.dtype not in (jnp.float32, jnp.bfloat16)
        or scale.shape != x.shape[1:]
        or scale.dtype != jnp.float32
    ):
        raise ValueError(
            f"onednn.{name} wants x (rows, D) float32/bfloat16 and a float32 scale (D,); "
            f"got {x.shape} {x.dtype}, {scale.shape} {scale.dtype}"
        )


def rms_norm_forward(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, in x's dtype (float32 statistics)."""
    _check_rms("rms_norm_forward", x, scale)
    return jax.ffi.ffi_call(RMS_NORM_FWD, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")(
        x, scale, eps=np.float32(eps)
    )


def rms_norm_backward(x: jax.Array, scale: jax.Array, dy: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """(dx in x's dtype, dscale float32) of `rms_norm_forward` for the cotangent dy (like x)."""
    _check_rms("rms_norm_backward", x, scale)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"onednn.rms_norm_backward: dy must be like x {x.shape} {x.dtype}, got {dy.shape} {dy.dtype}")
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(scale.shape, jnp.float32))
    return jax.ffi.ffi_call(RMS_NORM_BWD, out, vmap_method="sequential")(x, scale, dy, eps=np.float32(eps))


def dense_backward(x: jax.Array, w: jax.Array, dz: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients of x @ w + b for the output cotangent dz, in one call: dx = dz w^T in x's
    dtype, dW = x^T dz and db = dz summed over rows, both float32. x (M, K), w (K, N) and dz (M, N)
    share one dtype, float32 or bfloat16."""
    if not (x.dtype == w.dtype == dz.dtype) or x.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(
            "onednn.dense_backward takes float32 or bfloat16 x, w, dz of one dtype, "
            f"got {x.dtype}, {w.dtype}, {dz.dtype}"
        )
    if x.ndim != 2 or w.ndim != 2 or dz.shape != (x.shape[0], w.shape[1]) or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"onednn.dense_backward wants x (M, K), w (K, N), dz (M, N); got {x.shape}, {w.shape}, {dz.shape}"
        )
    out = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(w.shape, jnp.float32),
        jax.ShapeDtypeStruct(w.shape[1:], jnp.float32),
    )
    return jax.ffi.ffi_call(DENSE_BWD, out, vmap_method="sequential")(x, w, dz)
