// What the kernel sources share: the FFI API, a binding shorthand and the column sum (the dense backward in
// onednn_kernels.cc adds the bias gradient with it).
#pragma once

#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mmdit {

// An FFI binding of `Args` untyped buffer arguments, then `Rets` untyped results: XLA's builder adds
// one per call, and most handlers take nothing else. More (typed buffers, attributes) chain on.
// In XLA_FFI_DEFINE_HANDLER_SYMBOL put it in parentheses (the template's comma splits macro
// arguments).
template <int Args, int Rets, typename Binding = decltype(ffi::Ffi::Bind())>
auto AnyBuffers(Binding binding = ffi::Ffi::Bind()) {
  // Bindings cannot be copied or moved outside XLA's builder, only passed on as its temporaries:
  // the last step is returned as one, never the parameter itself.
  static_assert(Args + Rets > 0, "AnyBuffers binds at least one buffer");
  if constexpr (Args > 0 && Args + Rets > 1)
    return AnyBuffers<Args - 1, Rets>(std::move(binding).template Arg<ffi::AnyBuffer>());
  else if constexpr (Args > 0)
    return std::move(binding).template Arg<ffi::AnyBuffer>();
  else if constexpr (Rets > 1)
    return AnyBuffers<0, Rets - 1>(std::move(binding).template Ret<ffi::AnyBuffer>());
  else
    return std::move(binding).template Ret<ffi::AnyBuffer>();
}

// db (N) = the sum over the M rows of z (M, N, float32 or bf16): the dense layers' bias gradient
// (row_kernels.cc).
void ColumnSumInto(const void* z, bool bf16, int64_t M, int64_t N, float* db);
// acc (N) += the sum over the M rows of z, on the calling thread.
void ColumnSumAdd(const void* z, bool bf16, int64_t M, int64_t N, float* acc);

}  // namespace mmdit
