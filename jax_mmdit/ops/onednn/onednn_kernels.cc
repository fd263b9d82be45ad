// XLA:CPU custom calls on oneDNN: a (batched) matmul, linear layers (bias fused, result in the
// operands' dtype), the MLP's linear + GELU with its GELU backward, and a dense layer's whole
// backward. Fused attention is in attention_kernels.cc, the memory-bound row kernels (adaLN,
// QK-norm, gated residual) in row_kernels.cc.
//
// Matmul.
//
// Why: XLA:CPU runs bf16 dots on YNNPACK only in two operand layouts and upcasts the others to fp32,
// and never reaches AMX-class speed on this model's shapes; oneDNN's matmul primitive runs bf16 on
// AMX (avx512_core_amx_bf16) at 1000-2000 GFLOP/s on a 2-core Xeon, in every layout.
//
// Operands: a (..., M, K) or, with transpose_a, (..., K, M); b (K, N) or (N, K) with transpose_b,
// or with the same leading (batch) dims as a. Both float32 or both bfloat16. Result (..., M, N)
// float32, or bfloat16 for bfloat16 operands (rounded once from float32 accumulators).
// Transposes are strides in oneDNN's memory descriptors: no copies.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <omp.h>

#include "onednn_common.h"

using namespace mmdit;

namespace {

// batch, M, K, N, transpose_a, transpose_b, b_batched, bf16 operands, bf16 result
using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, bool, bool, bool>;

dnnl::memory::desc OperandDesc(int64_t batch, int64_t rows, int64_t cols, bool transposed,
                               bool batched, dnnl::memory::data_type dt) {
  // Logical (batch, rows, cols); stored (batch, rows, cols) or (batch, cols, rows) if transposed.
  dnnl::memory::dims strides = transposed ? dnnl::memory::dims{rows * cols, 1, rows}
                                          : dnnl::memory::dims{rows * cols, cols, 1};
  return dnnl::memory::desc({batched ? batch : 1, rows, cols}, dt, strides);
}

struct Entry {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul prim;
};

const Entry& Primitive(const Key& key) {
  return Cached<Key, Entry>(key, [&] {
    auto [batch, M, K, N, ta, tb, b_batched, bf16, out_bf16] = key;
    auto dt = bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
    auto a_md = OperandDesc(batch, M, K, ta, true, dt);
    auto b_md = OperandDesc(batch, K, N, tb, b_batched, dt);
    auto c_dt = out_bf16 ? dnnl::memory::data_type::bf16 : dnnl::memory::data_type::f32;
    dnnl::memory::desc c_md({batch, M, N}, c_dt, dnnl::memory::format_tag::abc);
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, c_md), UserScratchpad(), Engine());
    return Entry{pd, dnnl::matmul(pd)};
  });
}

// op(a) @ op(b) into `out` (float32 or the operands' dtype); `name` prefixes the error messages.
ffi::Error RunMatmul(const char* name, ffi::AnyBuffer a, ffi::AnyBuffer b, void* out, ffi::DataType out_type,
                     bool transpose_a, bool transpose_b) {
  auto a_dims = a.dimensions();
  auto b_dims = b.dimensions();
  if (a.element_type() != b.element_type() ||
      (a.element_type() != ffi::F32 && a.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument(std::string(name) + ": operands must both be float32 or bfloat16");
  if (out_type != ffi::F32 && out_type != a.element_type())
    return ffi::Error::InvalidArgument(std::string(name) + ": the result must be float32 or the operands' dtype");
  size_t rank = a_dims.size();
  if (rank < 2 || (b_dims.size() != 2 && b_dims.size() != rank))
    return ffi::Error::InvalidArgument(std::string(name) + ": a must be (..., M, K), b (K, N) or batched like a");
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) batch *= a_dims[i];
  int64_t M = transpose_a ? a_dims[rank - 1] : a_dims[rank - 2];
  int64_t K = transpose_a ? a_dims[rank - 2] : a_dims[rank - 1];
  size_t br = b_dims.size();
  int64_t Kb = transpose_b ? b_dims[br - 1] : b_dims[br - 2];
  int64_t N = transpose_b ? b_dims[br - 2] : b_dims[br - 1];
  if (K != Kb) return ffi::Error::InvalidArgument(std::string(name) + ": contraction sizes differ");
  bool b_batched = br == rank && rank > 2;
  try {
    Key key{batch, M, K, N, transpose_a, transpose_b, b_batched, a.element_type() == ffi::BF16,
            out_type == ffi::BF16};
    const Entry& entry = Primitive(key);
    const auto& pd = entry.pd;
    dnnl::memory a_mem(pd.src_desc(), Engine(), a.untyped_data());
    dnnl::memory b_mem(pd.weights_desc(), Engine(), b.untyped_data());
    dnnl::memory c_mem(pd.dst_desc(), Engine(), out);
    dnnl::stream stream(Engine());
    dnnl::memory scratch = ThreadScratchpad(pd.scratchpad_desc().get_size());
    entry.prim.execute(stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem},
                                {DNNL_ARG_SCRATCHPAD, scratch}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string(name) + ": " + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out, bool transpose_a,
                  bool transpose_b) {
  return RunMatmul("onednn_matmul", a, b, out->untyped_data(), out->element_type(), transpose_a, transpose_b);
}

// ---- linear, linear + GELU -------------------------------------------------------------------
// z = x w + b in x's dtype (x (M, K), w (K, N), both float32 or both bfloat16; b (N) float32), the
// bias riding in the matmul: in bf16 the activations between layers are bf16 (as under PyTorch
// autocast and on GPUs), so no float32 copy of every layer output is written, converted and
// carried into the backward. The MLP's first layer also returns a = GELU_tanh(z) from oneDNN's JIT
// eltwise (~3x XLA:CPU's tanh loop on AVX-512) and keeps only z for the backward, which recomputes
// GELU'(z): XLA's autodiff of the same function keeps a float32 tanh(.) besides a float32 z.

// M, K, N, bf16
using LinearKey = std::tuple<int64_t, int64_t, int64_t, bool>;

struct LinearPrims {
  dnnl::matmul::primitive_desc pd;
  dnnl::matmul mm;
  dnnl::eltwise_forward gelu;
  size_t gelu_scratch;
};

dnnl::eltwise_forward::primitive_desc GeluForwardDesc(int64_t n, dt type) {
  dnnl::memory::desc md({n}, type, dnnl::memory::format_tag::a);
  return dnnl::eltwise_forward::primitive_desc(
      dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_training, dnnl::algorithm::eltwise_gelu_tanh, md, 0.f, 0.f),
      UserScratchpad(), Engine());
}

const LinearPrims& LinearPrimitives(const LinearKey& key) {
  return Cached<LinearKey, LinearPrims>(key, [&] {
    auto [M, K, N, bf16] = key;
    dt type = bf16 ? dt::bf16 : dt::f32;
    dnnl::memory::desc x({M, K}, type, dnnl::memory::format_tag::ab), w({K, N}, type, dnnl::memory::format_tag::ab);
    dnnl::memory::desc b({1, N}, dt::f32, dnnl::memory::format_tag::ab), z({M, N}, type, dnnl::memory::format_tag::ab);
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(x, w, b, z), UserScratchpad(), Engine());
    auto gelu_pd = GeluForwardDesc(M * N, type);
    return LinearPrims{pd, dnnl::matmul(pd), dnnl::eltwise_forward(gelu_pd), gelu_pd.scratchpad_desc().get_size()};
  });
}

// z = x w + b, then a = GELU(z) when a is given.
ffi::Error RunLinear(const char* name, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b, void* z, void* a) {
  auto xd = x.dimensions(), wd = w.dimensions(), bd = b.dimensions();
  if (x.element_type() != w.element_type() || (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument(std::string(name) + ": x and w must both be float32 or bfloat16");
  if (xd.size() != 2 || wd.size() != 2 || bd.size() != 1 || xd[1] != wd[0] || bd[0] != wd[1])
    return ffi::Error::InvalidArgument(std::string(name) + ": wants x (M, K), w (K, N), b (N)");
  try {
    auto& eng = Engine();
    const LinearPrims& p = LinearPrimitives({xd[0], xd[1], wd[1], x.element_type() == ffi::BF16});
    dnnl::memory xm(p.pd.src_desc(), eng, x.untyped_data()), wm(p.pd.weights_desc(), eng, w.untyped_data());
    dnnl::memory bm(p.pd.bias_desc(), eng, b.typed_data()), zm(p.pd.dst_desc(), eng, z);
    dnnl::stream stream(eng);
    dnnl::memory scratch = ThreadScratchpad(std::max(p.pd.scratchpad_desc().get_size(), p.gelu_scratch));
    p.mm.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_BIAS, bm}, {DNNL_ARG_DST, zm},
                          {DNNL_ARG_SCRATCHPAD, scratch}});
    if (a != nullptr) {
      // An elementwise op needs no shape: z seen flat.
      dnnl::memory::desc flat({xd[0] * wd[1]}, p.pd.dst_desc().data_type(), dnnl::memory::format_tag::a);
      dnnl::memory zflat(flat, eng, z), aflat(flat, eng, a);
      p.gelu.execute(stream, {{DNNL_ARG_SRC, zflat}, {DNNL_ARG_DST, aflat}, {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string(name) + ": " + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Linear(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b, ffi::Result<ffi::AnyBuffer> z) {
  return RunLinear("onednn_linear", x, w, b, z->untyped_data(), nullptr);
}

ffi::Error LinearGelu(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> b, ffi::Result<ffi::AnyBuffer> z,
                      ffi::Result<ffi::AnyBuffer> a) {
  return RunLinear("onednn_linear_gelu", x, w, b, z->untyped_data(), a->untyped_data());
}

// dz = GELU_tanh'(z) * g, all of one dtype (float32 or bfloat16), any shape.
ffi::Error GeluBackward(ffi::AnyBuffer z, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dz) {
  if (z.element_type() != g.element_type() || (z.element_type() != ffi::F32 && z.element_type() != ffi::BF16) ||
      z.element_count() != g.element_count())
    return ffi::Error::InvalidArgument("onednn_gelu_bwd: z and g must have one shape and dtype, float32 or bfloat16");
  try {
    auto& eng = Engine();
    int64_t n = static_cast<int64_t>(z.element_count());
    bool bf16 = z.element_type() == ffi::BF16;
    using Bwd = std::pair<dnnl::eltwise_backward::primitive_desc, dnnl::eltwise_backward>;
    const auto& [pd, prim] = Cached<std::pair<int64_t, bool>, Bwd>({n, bf16}, [&] {
      auto fwd = GeluForwardDesc(n, bf16 ? dt::bf16 : dt::f32);
      auto md = fwd.src_desc();
      dnnl::eltwise_backward::primitive_desc bpd(
          dnnl::eltwise_backward::desc(dnnl::algorithm::eltwise_gelu_tanh, md, md, 0.f, 0.f), UserScratchpad(), eng, fwd);
      return Bwd{bpd, dnnl::eltwise_backward(bpd)};
    });
    dnnl::memory::desc md({n}, bf16 ? dt::bf16 : dt::f32, dnnl::memory::format_tag::a);
    dnnl::memory zm(md, eng, z.untyped_data()), gm(md, eng, g.untyped_data()), dzm(md, eng, dz->untyped_data());
    dnnl::stream stream(eng);
    prim.execute(stream, {{DNNL_ARG_SRC, zm}, {DNNL_ARG_DIFF_DST, gm}, {DNNL_ARG_DIFF_SRC, dzm},
                          {DNNL_ARG_SCRATCHPAD, ThreadScratchpad(pd.scratchpad_desc().get_size())}});
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_gelu_bwd: ") + e.what());
  }
  return ffi::Error::Success();
}

// ---- dense layer backward ---------------------------------------------------------------------
// x (M, K), w (K, N), dz (M, N) -> dx = dz w^T (x's dtype), dW = x^T dz and db = sum_rows dz (both
// float32), one after another in one call. As three custom calls XLA ran them concurrently (they
// share only dz), each oneDNN/OpenMP call with a team as wide as the machine: on 2 cores the weight
// gradient beside the column sum ran at half its solo speed, and small ops queued behind them for a
// scheduler slice (a (128, 1152) column sum took 8 ms).

// By blocks of rows: a tall dz read by three products goes through memory once if each thread
// takes an equal share of the rows and runs the three block by block on single-threaded primitives
// (oneDNN runs one thread inside a parallel region), the block staying in the core's cache in
// between. As three whole-array passes, the default config's fc1 backward took 12.7 ms in the
// train step against ~10 ms alone on inputs already in cache. (Linear + GELU by the same blocks,
// the GELU reading each block of z from cache, measured no faster: that pass is not memory-bound.)

// Rows per block: ~1.5 MiB of an (N)-wide row of `elem`-byte values, so a block and its slice of
// the other operand stay in a core's 2 MiB L2; at most 512 (256 measured the same, 1024 slower in
// bf16).
int64_t BlockRows(int64_t N, size_t elem) {
  return std::clamp<int64_t>((int64_t{3} << 19) / (N * static_cast<int64_t>(elem)), 64, 512);
}

// Share t of `threads` equal shares of M rows, [begin, end), split into n blocks of equal size up to
// one row.
struct RowBlocks {
  int64_t begin, end, n;
  RowBlocks(int64_t M, int threads, int t, int64_t block_rows)
      : begin(M * t / threads), end(M * (t + 1) / threads), n((end - begin + block_rows - 1) / block_rows) {}
  int64_t first(int64_t b) const { return begin + (end - begin) * b / n; }
  int64_t last(int64_t b) const { return first(b + 1); }
};

// rows, K, N, bf16, accumulate: dW (+)= x_b^T dz_b for one block of rows (run single-threaded).
using WeightGradKey = std::tuple<int64_t, int64_t, int64_t, bool, bool>;

const Entry& WeightGradPrimitive(const WeightGradKey& key) {
  return Cached<WeightGradKey, Entry>(key, [&] {
    auto [rows, K, N, bf16, accumulate] = key;
    auto type = bf16 ? dt::bf16 : dt::f32;
    dnnl::memory::desc c_md({1, K, N}, dt::f32, dnnl::memory::format_tag::abc);
    dnnl::primitive_attr attr = UserScratchpad();
    if (accumulate) {
      dnnl::post_ops ops;
      ops.append_sum(1.0f);
      attr.set_post_ops(ops);
    }
    dnnl::matmul::desc desc(OperandDesc(1, K, rows, true, true, type), OperandDesc(1, rows, N, false, false, type), c_md);
    dnnl::matmul::primitive_desc pd(desc, attr, Engine());
    return Entry{pd, dnnl::matmul(pd)};
  });
}

// The dense backward by blocks of rows: per block, its rows of dx, its x^T dz added to its share's
// partial dW and its column sums to the share's partial db. The partials are added at the end (a
// pass over threads x K x N floats; small next to the products while every thread has a block).
ffi::Error BlockedDenseBackward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dz, ffi::Result<ffi::AnyBuffer> dx,
                                ffi::Result<ffi::Buffer<ffi::F32>> dw, ffi::Result<ffi::Buffer<ffi::F32>> db,
                                int threads, int64_t block_rows) {
  int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  bool bf16 = x.element_type() == ffi::BF16;
  size_t elem = bf16 ? 2 : 4;
  // Share 0 accumulates into dW itself, the others into partials (uninitialised: each share's
  // first block writes without adding).
  std::unique_ptr<float[]> dw_part(new float[static_cast<size_t>(threads - 1) * K * N]);
  std::vector<float> db_part(static_cast<size_t>(threads) * N, 0.f);
  const char *xp = static_cast<const char*>(x.untyped_data()), *zp = static_cast<const char*>(dz.untyped_data());
  char* dxp = static_cast<char*>(dx->untyped_data());
  // dx_b = dz_b w^T for a block of `rows` rows.
  auto dx_key = [&](int64_t rows) { return Key{1, rows, N, K, false, true, false, bf16, bf16}; };
  try {  // every block size's primitives (at most two sizes per share), made before the parallel region
    for (int t = 0; t < threads; ++t) {
      RowBlocks rb(M, threads, t, block_rows);
      for (int64_t b : {int64_t{0}, rb.n - 1}) {
        int64_t rows = rb.last(b) - rb.first(b);
        Primitive(dx_key(rows));
        for (bool accumulate : {false, true}) WeightGradPrimitive({rows, K, N, bf16, accumulate});
      }
    }
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("dense_bwd: ") + e.what());
  }
  std::string error;
#pragma omp parallel num_threads(threads)
  {
    try {
      auto& eng = Engine();
      dnnl::stream stream(eng);
      // Share by share (a team smaller than asked for takes several), each share's blocks in order.
      for (int t = omp_get_thread_num(); t < threads; t += omp_get_num_threads()) {
        float* dw_t = t == 0 ? dw->typed_data() : dw_part.get() + static_cast<size_t>(t - 1) * K * N;
        RowBlocks rb(M, threads, t, block_rows);
        for (int64_t b = 0; b < rb.n; ++b) {
          int64_t r0 = rb.first(b), rows = rb.last(b) - r0;
          void* zb = const_cast<char*>(zp + r0 * N * elem);
          const Entry& dxe = Primitive(dx_key(rows));
          dxe.prim.execute(stream, {{DNNL_ARG_SRC, dnnl::memory(dxe.pd.src_desc(), eng, zb)},
                                    {DNNL_ARG_WEIGHTS, dnnl::memory(dxe.pd.weights_desc(), eng, w.untyped_data())},
                                    {DNNL_ARG_DST, dnnl::memory(dxe.pd.dst_desc(), eng, dxp + r0 * K * elem)},
                                    {DNNL_ARG_SCRATCHPAD, ThreadScratchpad(dxe.pd.scratchpad_desc().get_size())}});
          const Entry& dwe = WeightGradPrimitive({rows, K, N, bf16, b > 0});
          void* xb = const_cast<char*>(xp + r0 * K * elem);
          dwe.prim.execute(stream, {{DNNL_ARG_SRC, dnnl::memory(dwe.pd.src_desc(), eng, xb)},
                                    {DNNL_ARG_WEIGHTS, dnnl::memory(dwe.pd.weights_desc(), eng, zb)},
                                    {DNNL_ARG_DST, dnnl::memory(dwe.pd.dst_desc(), eng, dw_t)},
                                    {DNNL_ARG_SCRATCHPAD, ThreadScratchpad(dwe.pd.scratchpad_desc().get_size())}});
          ColumnSumAdd(zb, bf16, rows, N, db_part.data() + static_cast<size_t>(t) * N);
        }
      }
    } catch (const std::exception& e) {
#pragma omp critical
      error = e.what();
    }
  }
  if (!error.empty()) return ffi::Error::Internal("dense_bwd: " + error);
  float *dwo = dw->typed_data(), *dbo = db->typed_data();
  int64_t KN = K * N;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < KN; ++i)
    for (int t = 1; t < threads; ++t) dwo[i] += dw_part[static_cast<size_t>(t - 1) * KN + i];
  std::fill(dbo, dbo + N, 0.f);
  ColumnSumAdd(db_part.data(), false, threads, N, dbo);
  return ffi::Error::Success();
}

ffi::Error DenseBackward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer dz, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Result<ffi::Buffer<ffi::F32>> dw, ffi::Result<ffi::Buffer<ffi::F32>> db) {
  auto xd = x.dimensions(), wd = w.dimensions(), zd = dz.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || zd.size() != 2 || xd[0] != zd[0] || xd[1] != wd[0] ||
      wd[1] != zd[1] || dz.element_type() != x.element_type() || db->element_count() != static_cast<size_t>(zd[1]))
    return ffi::Error::InvalidArgument("dense_bwd: wants x (M, K), w (K, N), dz (M, N) like x, db (N)");
  // Tall dz (each thread gets at least a block of rows): blocked, dz read from memory once.
  int threads = std::max(1, omp_get_max_threads());
  int64_t block_rows = BlockRows(zd[1], dz.element_type() == ffi::BF16 ? 2 : 4);
  if (zd[0] >= threads * block_rows)
    return BlockedDenseBackward(x, w, dz, dx, dw, db, threads, block_rows);
  if (auto err = RunMatmul("dense_bwd", dz, w, dx->untyped_data(), dx->element_type(), false, true); !err.success())
    return err;
  ColumnSumInto(dz.untyped_data(), dz.element_type() == ffi::BF16, zd[0], zd[1], db->typed_data());
  return RunMatmul("dense_bwd", x, dz, dw->typed_data(), ffi::F32, true, false);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnLinear, Linear,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnLinearGelu, LinearGelu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnGeluBwd, GeluBackward, (AnyBuffers<2, 1>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnMatmul, Matmul,
                              (AnyBuffers<2, 1>().Attr<bool>("transpose_a").Attr<bool>("transpose_b")));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditDenseBwd, DenseBackward,
                              (AnyBuffers<3, 1>().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>()));
