"""The CPU backend on the package's C++ kernels: oneDNN matmuls and fused attention, and plain C++
row passes, called from XLA programs as FFI custom calls.

- `backend.py`: `OnednnOps` (the operations as custom_vjps over the kernels) and their FLOP count;
- `calls.py`: each kernel as a JAX function (`jax.ffi.ffi_call` plus its operand checks);
- `build.py`: compiling the C++ (`*.cc`, `*.h`) at start-up and registering it with XLA (`load`);
- `onednn_kernels.cc` (dense layers, matmul), `attention_kernels.cc`, `row_kernels.cc`: the kernels,
  each with a comment saying what it replaced and why.
"""

from jax_mmdit.ops.onednn.backend import OnednnOps
from jax_mmdit.ops.onednn.build import load

__all__ = ["OnednnOps", "load"]
