// XLA:CPU custom call: (batched) matmul on oneDNN, float32 result.
//
// Why: XLA:CPU runs bf16 dots on YNNPACK only in two operand layouts and upcasts the others to fp32,
// and never reaches AMX-class speed on this model's shapes; oneDNN's matmul primitive runs bf16 on
// AMX (avx512_core_amx_bf16) at 1000-2000 GFLOP/s on a 2-core Xeon, in every layout.
//
// Operands: a (..., M, K) or, with transpose_a, (..., K, M); b (K, N) or (N, K) with transpose_b,
// or with the same leading (batch) dims as a. Both float32 or both bfloat16. Result (..., M, N) f32.
// Transposes are strides in oneDNN's memory descriptors: no copies.
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// batch, M, K, N, transpose_a, transpose_b, b_batched, bf16
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, bool, bool>;

dnnl::memory::desc OperandDesc(int64_t batch, int64_t rows, int64_t cols, bool transposed,
                               bool batched, dnnl::memory::data_type dt) {
  // Logical (batch, rows, cols); stored (batch, rows, cols) or (batch, cols, rows) if transposed.
  dnnl::memory::dims strides = transposed ? dnnl::memory::dims{rows * cols, 1, rows}
                                          : dnnl::memory::dims{rows * cols, cols, 1};
  return dnnl::memory::desc({batched ? batch : 1, rows, cols}, dt, strides);
}

// Primitive creation dispatches over oneDNN's implementations (tens of microseconds); a train step
// calls the same few shapes hundreds of times, so primitives are kept per shape.
struct Entry {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul prim;
};

const Entry& Primitive(const Key& key) {
  static std::mutex mutex;
  static std::map<Key, Entry> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto [batch, M, K, N, ta, tb, b_batched, bf16] = key;
  auto dt = bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
  auto a_md = OperandDesc(batch, M, K, ta, true, dt);
  auto b_md = OperandDesc(batch, K, N, tb, b_batched, dt);
  dnnl::memory::desc c_md({batch, M, N}, dnnl::memory::data_type::f32, dnnl::memory::format_tag::abc);
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), Engine());
  return cache.emplace(key, Entry{pd, dnnl::matmul(pd)}).first->second;
}

ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::Buffer<ffi::F32>> out,
                  bool transpose_a, bool transpose_b) {
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  if (a.element_type() != b.element_type() ||
      (a.element_type() != ffi::F32 && a.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument("onednn_matmul: operands must both be float32 or bfloat16");
  size_t rank = a_dims.size();
  if (rank < 2 || (b_dims.size() != 2 && b_dims.size() != rank))
    return ffi::Error::InvalidArgument("onednn_matmul: a must be (..., M, K), b (K, N) or batched like a");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) batch *= a_dims[i];
  int64_t M = transpose_a ? a_dims[rank - 1] : a_dims[rank - 2];
  int64_t K = transpose_a ? a_dims[rank - 2] : a_dims[rank - 1];
  size_t br = b_dims.size();
  int64_t Kb = transpose_b ? b_dims[br - 1] : b_dims[br - 2];
  int64_t N = transpose_b ? b_dims[br - 2] : b_dims[br - 1];
  if (K != Kb) return ffi::Error::InvalidArgument("onednn_matmul: contraction sizes differ");
  bool b_batched = br == rank && rank > 2;
  try {
    Key key{batch, M, K, N, transpose_a, transpose_b, b_batched, a.element_type() == ffi::BF16};
    const Entry& entry = Primitive(key);
    const auto& pd = entry.pd;
    dnnl::memory a_mem(pd.src_desc(), Engine(), a.untyped_data());
    dnnl::memory b_mem(pd.weights_desc(), Engine(), b.untyped_data());
    dnnl::memory c_mem(pd.dst_desc(), Engine(), out->typed_data());
    dnnl::stream stream(Engine());
    entry.prim.execute(stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_matmul: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
