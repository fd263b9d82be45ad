"""The operations the models are written in, and the backends that compute them.

A model never asks which device or kernel library it runs on: it calls the methods of an `Ops`
object it was built with (dense, dense + GELU, adaLN's LayerNorm + modulation, the gated residual,
RMSNorm, attention with an optional key mask, packed and joint attention). `resolve` picks the
backend once, when a Trainer or a model is built:

| kernels  | platform | backend                                                               |
|----------|----------|-----------------------------------------------------------------------|
| "xla"    | cpu      | `XlaCpuOps`: XLA, in the layouts XLA:CPU runs fast (`ops/xla.py`)      |
| "xla"    | gpu, tpu | `XlaOps`: XLA; attention by `jax.nn.dot_product_attention` (cuDNN)     |
| "onednn" | cpu      | `OnednnOps`: the package's C++/oneDNN kernels (`ops/onednn/`)          |
| "auto"   |          | "onednn" on a one-device CPU mesh where the kernels build, else "xla"  |

`ReferenceOps` (`ops/reference.py`) is the plain-jnp maths all of them reproduce; the tests compare
each backend with it. Every backend also answers `flops(compiled)` (XLA's count plus its kernels')
and `kernel_calls(compiled)`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Literal, get_args

import jax

from jax_mmdit.errors import UserError
from jax_mmdit.ops.reference import ReferenceOps
from jax_mmdit.ops.xla import XlaCpuOps, XlaOps

Ops = ReferenceOps  # the interface every backend implements
Kernels = Literal["auto", "xla", "onednn"]
KERNELS: tuple[str, ...] = get_args(Kernels)
# How attention runs where a backend has a choice (TrainConfig.attention).
Attention = Literal["auto", "xla", "cudnn"]
ATTENTIONS: tuple[str, ...] = get_args(Attention)

_auto_override: str | None = None


def set_auto(kernels: Literal["xla", "onednn"] | None) -> str | None:
    """Make `kernels="auto"` mean `kernels` in this process from now on (None: the rule above);
    returns the previous setting. For a test suite or benchmark that runs everything on one
    backend; a run chooses with --kernels."""
    global _auto_override
    if kernels not in (None, "xla", "onednn"):
        raise ValueError(f"set_auto takes 'xla', 'onednn' or None, got {kernels!r}.")
    previous, _auto_override = _auto_override, kernels
    return previous


def resolve(
    kernels: str = "auto", attention: str = "auto", devices=None, fp8: bool = False, forward_mode: bool = False
) -> Ops:
    """The backend for `kernels` (see the table) on `devices` (default: all of jax's), with
    attention implementation `attention` ("auto", "xla" or "cudnn"); with `fp8`, its dense layers
    inside the transformer blocks run in fp8 (`ops.fp8`). Builds the C++ kernels here when they are
    chosen; "auto" falls back to XLA after a one-line warning when they cannot be built, an
    explicit "onednn" fails. `forward_mode`: the model is also differentiated forward (`jax.jvp`,
    MeanFlow). The fast paths are custom VJPs, which define reverse-mode derivatives only, so this
    is `ReferenceOps`, the plain maths every transform differentiates (XLA fuses it on any device)."""
    if forward_mode:
        if fp8 or kernels == "onednn" or attention == "cudnn":
            raise UserError(
                "The oneDNN kernels, cuDNN attention and fp8 have reverse-mode derivatives only; a jvp of the "
                "model (meanflow) needs --kernels auto or xla, attention auto or xla, and no fp8."
            )
        return ReferenceOps(attention_impl="xla")
    if fp8:
        from jax_mmdit.ops.fp8 import Fp8Ops

        return Fp8Ops(resolve(kernels, attention, devices))
    if kernels not in KERNELS:
        raise UserError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}.")
    if attention not in ATTENTIONS:
        raise UserError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}.")
    devices = list(jax.devices() if devices is None else devices)
    platform = devices[0].platform
    if attention == "cudnn" and platform != "gpu":
        raise UserError(f"attention='cudnn' needs a GPU; this run is on {platform}: use attention 'auto' or 'xla'.")
    if kernels == "auto":
        kernels = _auto_override or ("onednn" if platform == "cpu" and len(devices) == 1 else "xla")
        if kernels == "onednn" and platform == "cpu" and _onednn_unavailable(required=False):
            kernels = "xla"
    elif kernels == "onednn":
        if platform != "cpu":
            raise UserError(f"kernels='onednn' runs on CPUs only; this run is on {platform}: use 'auto' or 'xla'.")
        _onednn_unavailable(required=True)
    if kernels == "onednn" and platform == "cpu":
        from jax_mmdit.ops.onednn import OnednnOps

        return OnednnOps(attention_impl=attention)
    if platform == "cpu":
        return XlaCpuOps(attention_impl=attention)
    return XlaOps(attention_impl=attention, platform=platform)


def _onednn_unavailable(required: bool) -> bool:
    from jax_mmdit.ops import onednn

    reason = onednn.load()
    if reason is None:
        return False
    if required:
        raise UserError(f"kernels='onednn' but the C++ kernels are unavailable: {reason}")
    _warn_once(reason)
    return True


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"the C++/oneDNN kernels are unavailable ({reason}); running on XLA's ops, slower on CPU. "
        "Install g++ and libdnnl-dev (make setup does), or pass --kernels xla to silence this.",
        stacklevel=3,
    )


__all__ = [
    "ATTENTIONS",
    "KERNELS",
    "Attention",
    "Kernels",
    "Ops",
    "ReferenceOps",
    "XlaCpuOps",
    "XlaOps",
    "resolve",
    "set_auto",
]
