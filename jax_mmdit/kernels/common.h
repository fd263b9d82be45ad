// What the two kernel sources share: the FFI API and the column sum (the dense backward in
// onednn_kernels.cc adds the bias gradient with it).
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mmdit {

// db (N) = the sum over the M rows of z (M, N, float32 or bf16): the dense layers' bias gradient
// (row_kernels.cc).
void ColumnSumInto(const void* z, bool bf16, int64_t M, int64_t N, float* db);

}  // namespace mmdit
