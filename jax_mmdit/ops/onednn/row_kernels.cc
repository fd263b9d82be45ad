// Memory-bound kernels in plain C++ with OpenMP (one pass over rows, vectorised per row): adaLN
// (LayerNorm + per-sample modulation; oneDNN's layer normalization has one scale/shift for all
// rows) forward and backward, QK-norm's RMSNorm, the gated residual's backward, and the column sum
// the dense backward (onednn_kernels.cc) uses for the bias gradient.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <omp.h>

#include "common.h"

namespace mmdit {

namespace {

inline float Bf16ToF32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {  // round to nearest even, as XLA's convert; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, quiet_nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);  // a select: vectorises
}

// Row kernels are built for AVX-512, AVX2 and the x86-64 baseline and picked at load time (the
// library is compiled without -march: one build serves any x86-64 machine sharing the cache).
#if defined(__x86_64__)
#define MMDIT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MMDIT_CLONES
#endif

// ---- adaLN: LayerNorm(x) * (1 + scale) + shift --------------------------------------------------
// x (B, L, D) float32 (the residual stream), shift and scale (B, D) float32, h (B, L, D) float32 or
// bfloat16. Why a kernel: XLA:CPU splits the forward into a float32 statistics pass and a
// normalise/modulate/convert pass, and autodiff's backward into separate reductions over D (two
// per row) and over L (the shift/scale gradients) plus converts, each a pass over (B, L, D) arrays.
// Here a row (D values, a few KiB) is read once into L1 and everything is done from there: the
// forward reads x and writes h; the backward reads x and dh and writes dx, accumulating the
// shift/scale gradients of its sample in registers/L1. Statistics are two-pass in float32 (mean,
// then the mean square of x - mean), as XLA's reference computes them; nothing is saved for the
// backward, which recomputes them from x (cheaper than writing and reading them back).
// Samples are split over OpenMP threads, so the (B, D) gradients need no atomics.

// mean and 1/sqrt(var + eps) of one row.
inline void RowStats(const float* x, int64_t D, float eps, float* mean, float* rstd) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < D; ++i) sum += x[i];
  float mu = sum / static_cast<float>(D), sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < D; ++i) sq += (x[i] - mu) * (x[i] - mu);
  *mean = mu;
  *rstd = 1.0f / std::sqrt(sq / static_cast<float>(D) + eps);
}

// h = LayerNorm(x) * (1 + scale) + shift for one row, in float32 or (h16) bf16.
MMDIT_CLONES
void AdaLnRowForward(const float* x, const float* shift, const float* scale, int64_t D, float eps, float* h32,
                     uint16_t* h16) {
  float mu, rstd;
  RowStats(x, D, eps, &mu, &rstd);
  if (h16 != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) h16[i] = F32ToBf16((x[i] - mu) * rstd * (1.0f + scale[i]) + shift[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) h32[i] = (x[i] - mu) * rstd * (1.0f + scale[i]) + shift[i];
  }
}

// One row of the backward: dx from x and d (dh in float32), accumulating into dshift and dscale;
// xhat and gs are D floats of scratch.
MMDIT_CLONES
void AdaLnRowBackward(const float* x, const float* d, const float* scale, int64_t D, float eps, float* dx,
                      float* dshift, float* dscale, float* xhat, float* gs) {
  float mu, rstd;
  RowStats(x, D, eps, &mu, &rstd);
  float sum_g = 0.f, sum_gx = 0.f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
  for (int64_t i = 0; i < D; ++i) {
    float xh = (x[i] - mu) * rstd;
    dshift[i] += d[i];
    dscale[i] += d[i] * xh;
    float gi = d[i] * (1.0f + scale[i]);
    xhat[i] = xh;
    gs[i] = gi;
    sum_g += gi;
    sum_gx += gi * xh;
  }
  float mean_g = sum_g / static_cast<float>(D), mean_gx = sum_gx / static_cast<float>(D);
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) dx[i] = rstd * (gs[i] - mean_g - xhat[i] * mean_gx);
}

MMDIT_CLONES
void Bf16RowToF32(const uint16_t* v, int64_t D, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < D; ++i) out[i] = Bf16ToF32(v[i]);
}

// Row i of a float32 or bf16 array as float32: the row itself, or converted into buf.
inline const float* RowF32(const void* base, bool bf16, int64_t i, int64_t D, float* buf) {
  if (!bf16) return static_cast<const float*>(base) + i * D;
  Bf16RowToF32(static_cast<const uint16_t*>(base) + i * D, D, buf);
  return buf;
}

// acc += row (float32 or bf16), N values.
MMDIT_CLONES
void AddRow(const float* row, int64_t N, float* acc) {
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) acc[i] += row[i];
}

MMDIT_CLONES
void AddRowBf16(const uint16_t* row, int64_t N, float* acc) {
#pragma omp simd
  for (int64_t i = 0; i < N; ++i) acc[i] += Bf16ToF32(row[i]);
}

ffi::Error CheckAdaLn(const char* name, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, int64_t* B,
                      int64_t* L, int64_t* D) {
  auto xd = x.dimensions(), sd = scale.dimensions();
  if (xd.size() != 3 || sd.size() != 2 || sd[0] != xd[0] || sd[1] != xd[2])
    return ffi::Error::InvalidArgument(std::string(name) + ": wants x (B, L, D) and shift, scale (B, D)");
  *B = xd[0], *L = xd[1], *D = xd[2];
  return ffi::Error::Success();
}

ffi::Error AdaLnForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> shift, ffi::Buffer<ffi::F32> scale,
                        ffi::Result<ffi::AnyBuffer> h, float eps) {
  int64_t B, L, D;
  if (auto err = CheckAdaLn("adaln_fwd", x, scale, &B, &L, &D); !err.success()) return err;
  if (shift.dimensions().size() != 2 || shift.element_count() != scale.element_count() ||
      h->element_count() != x.element_count() || (h->element_type() != ffi::F32 && h->element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument("adaln_fwd: shift must be like scale, h like x in float32 or bfloat16");
  bool bf16 = h->element_type() == ffi::BF16;
  const float *xs = x.typed_data(), *sh = shift.typed_data(), *sc = scale.typed_data();
  void* out = h->untyped_data();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B * L; ++r) {
    const float* xr = xs + r * D;
    const float *shb = sh + (r / L) * D, *scb = sc + (r / L) * D;
    if (bf16) AdaLnRowForward(xr, shb, scb, D, eps, nullptr, static_cast<uint16_t*>(out) + r * D);
    else AdaLnRowForward(xr, shb, scb, D, eps, static_cast<float*>(out) + r * D, nullptr);
  }
  return ffi::Error::Success();
}

// dh (B, L, D) float32 or bfloat16 -> dx (B, L, D), dshift and dscale (B, D), all float32.
ffi::Error AdaLnBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer dh,
                         ffi::Result<ffi::Buffer<ffi::F32>> dx, ffi::Result<ffi::Buffer<ffi::F32>> dshift,
                         ffi::Result<ffi::Buffer<ffi::F32>> dscale, float eps) {
  int64_t B, L, D;
  if (auto err = CheckAdaLn("adaln_bwd", x, scale, &B, &L, &D); !err.success()) return err;
  if (dh.element_count() != x.element_count() || (dh.element_type() != ffi::F32 && dh.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument("adaln_bwd: dh must be like x, in float32 or bfloat16");
  bool bf16 = dh.element_type() == ffi::BF16;
  const float *xs = x.typed_data(), *sc = scale.typed_data();
  const void* g = dh.untyped_data();
  float *dxs = dx->typed_data(), *dsh = dshift->typed_data(), *dsc = dscale->typed_data();
#pragma omp parallel
  {
    std::vector<float> xhat(D), gs(D), d32(D);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const float* scb = sc + b * D;
      float *dshb = dsh + b * D, *dscb = dsc + b * D;
      std::fill(dshb, dshb + D, 0.f);
      std::fill(dscb, dscb + D, 0.f);
      for (int64_t l = 0; l < L; ++l) {
        int64_t r = b * L + l;
        const float* xr = xs + r * D;
        const float* d = RowF32(g, bf16, r, D, d32.data());
        AdaLnRowBackward(xr, d, scb, D, eps, dxs + r * D, dshb, dscb, xhat.data(), gs.data());
      }
    }
  }
  return ffi::Error::Success();
}

// ---- RMSNorm with a learned scale (MMDiT's QK-norm) -------------------------------------------
// y = x * r * scale per row of D (a head), r = 1/sqrt(mean(x^2) + eps); x and y float32 or bf16,
// scale float32 (D). Backward, for g = dy * scale: dx = r * g - r^3 * x * mean(g * x), and
// dscale = sum over rows of dy * x * r (per-thread partial sums, added in thread order). XLA:CPU
// ran the forward and backward as several passes over the (B, L, H, D) arrays plus a one-thread
// reduction for dscale (MMDiT-S/2 b32 bf16: ~300 ms of thread time per step in those fusions).

MMDIT_CLONES
void StoreRow(const float* v, int64_t D, bool bf16, void* base, int64_t i) {
  if (bf16) {
    uint16_t* out = static_cast<uint16_t*>(base) + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) out[j] = F32ToBf16(v[j]);
  } else {
    std::memcpy(static_cast<float*>(base) + i * D, v, D * sizeof(float));
  }
}

inline float RmsInverse(const float* x, int64_t D, float eps) {
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < D; ++j) sq += x[j] * x[j];
  return 1.0f / std::sqrt(sq / static_cast<float>(D) + eps);
}

MMDIT_CLONES
void RmsRowForward(const float* x, const float* scale, int64_t D, float eps, float* y) {
  float r = RmsInverse(x, D, eps);
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) y[j] = x[j] * r * scale[j];
}

MMDIT_CLONES
void RmsRowBackward(const float* x, const float* dy, const float* scale, int64_t D, float eps, float* dx,
                    float* dscale) {
  float r = RmsInverse(x, D, eps), gx = 0.f;
#pragma omp simd reduction(+ : gx)
  for (int64_t j = 0; j < D; ++j) gx += dy[j] * scale[j] * x[j];
  float c = r * r * r * gx / static_cast<float>(D);
#pragma omp simd
  for (int64_t j = 0; j < D; ++j) {
    dx[j] = r * dy[j] * scale[j] - c * x[j];
    dscale[j] += dy[j] * x[j] * r;
  }
}

ffi::Error CheckRms(const char* name, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, int64_t* rows, int64_t* D) {
  auto xd = x.dimensions();
  if (xd.size() != 2 || scale.element_count() != static_cast<size_t>(xd[1]) ||
      (x.element_type() != ffi::F32 && x.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument(std::string(name) + ": wants x (rows, D) float32 or bfloat16 and scale (D)");
  *rows = xd[0];
  *D = xd[1];
  return ffi::Error::Success();
}

ffi::Error RmsNormForward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Result<ffi::AnyBuffer> y, float eps) {
  int64_t rows, D;
  if (auto err = CheckRms("rms_norm_fwd", x, scale, &rows, &D); !err.success()) return err;
  bool bf16 = x.element_type() == ffi::BF16;
  if (y->element_type() != x.element_type() || y->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("rms_norm_fwd: y must be like x");
#pragma omp parallel
  {
    std::vector<float> xb(D), yb(D);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      RmsRowForward(RowF32(x.untyped_data(), bf16, i, D, xb.data()), scale.typed_data(), D, eps, yb.data());
      StoreRow(yb.data(), D, bf16, y->untyped_data(), i);
    }
  }
  return ffi::Error::Success();
}

ffi::Error RmsNormBackward(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::AnyBuffer dy,
                           ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::Buffer<ffi::F32>> dscale, float eps) {
  int64_t rows, D;
  if (auto err = CheckRms("rms_norm_bwd", x, scale, &rows, &D); !err.success()) return err;
  bool bf16 = x.element_type() == ffi::BF16;
  if (dy.element_type() != x.element_type() || dy.element_count() != x.element_count() ||
      dx->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("rms_norm_bwd: dy and dx must be like x");
  int threads = std::max(1, omp_get_max_threads());
  std::vector<float> partial(static_cast<size_t>(threads) * D, 0.f);
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> xb(D), gb(D), dxb(D);
    float* acc = partial.data() + static_cast<size_t>(t) * D;
    for (int64_t i = rows * t / nt; i < rows * (t + 1) / nt; ++i) {
      RmsRowBackward(RowF32(x.untyped_data(), bf16, i, D, xb.data()), RowF32(dy.untyped_data(), bf16, i, D, gb.data()),
                     scale.typed_data(), D, eps, dxb.data(), acc);
      StoreRow(dxb.data(), D, bf16, dx->untyped_data(), i);
    }
  }
  float* ds = dscale->typed_data();
  std::fill(ds, ds + D, 0.f);
  for (int t = 0; t < threads; ++t) AddRow(partial.data() + static_cast<size_t>(t) * D, D, ds);
  return ffi::Error::Success();
}

// ---- gated residual backward -----------------------------------------------------------------
// y = x + gate * a (adaLN-Zero's gated branch added to the float32 residual stream; gate (B, D)
// float32, a (B, L, D) float32 or bfloat16): for the cotangent dy (float32) da = gate * dy in a's
// dtype and dgate = sum over L of dy * a, both from one read of dy and a (dx is dy itself). XLA ran
// da and dgate as two passes over dy, the reduction over L on one thread.

MMDIT_CLONES
void GatedRowBackward(const float* gate, const float* a32, const uint16_t* a16, const float* dy, int64_t D,
                      float* da32, uint16_t* da16, float* dgate) {
  if (a16 != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) {
      da16[i] = F32ToBf16(gate[i] * dy[i]);
      dgate[i] += dy[i] * Bf16ToF32(a16[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) {
      da32[i] = gate[i] * dy[i];
      dgate[i] += dy[i] * a32[i];
    }
  }
}

ffi::Error GatedResidualBackward(ffi::Buffer<ffi::F32> gate, ffi::AnyBuffer a, ffi::Buffer<ffi::F32> dy,
                                 ffi::Result<ffi::AnyBuffer> da, ffi::Result<ffi::Buffer<ffi::F32>> dgate) {
  auto ad = a.dimensions(), gd = gate.dimensions();
  if (ad.size() != 3 || gd.size() != 2 || gd[0] != ad[0] || gd[1] != ad[2] ||
      dy.element_count() != a.element_count() || da->element_type() != a.element_type() ||
      (a.element_type() != ffi::F32 && a.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument(
        "gated_residual_bwd: wants gate (B, D), a (B, L, D) float32 or bfloat16, dy (B, L, D) float32");
  int64_t B = ad[0], L = ad[1], D = ad[2];
  bool bf16 = a.element_type() == ffi::BF16;
  const float *g = gate.typed_data(), *dys = dy.typed_data();
  float* dg = dgate->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    float* dgb = dg + b * D;
    std::fill(dgb, dgb + D, 0.f);
    for (int64_t l = 0; l < L; ++l) {
      int64_t r = (b * L + l) * D;
      if (bf16)
        GatedRowBackward(g + b * D, nullptr, static_cast<const uint16_t*>(a.untyped_data()) + r, dys + r, D, nullptr,
                         static_cast<uint16_t*>(da->untyped_data()) + r, dgb);
      else
        GatedRowBackward(g + b * D, static_cast<const float*>(a.untyped_data()) + r, nullptr, dys + r, D,
                         static_cast<float*>(da->untyped_data()) + r, nullptr, dgb);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

void ColumnSumAdd(const void* z, bool bf16, int64_t M, int64_t N, float* acc) {
  for (int64_t r = 0; r < M; ++r) {
    if (bf16) AddRowBf16(static_cast<const uint16_t*>(z) + r * N, N, acc);
    else AddRow(static_cast<const float*>(z) + r * N, N, acc);
  }
}

void ColumnSumInto(const void* z, bool bf16, int64_t M, int64_t N, float* db) {
  int threads = std::max(1, omp_get_max_threads());
  std::vector<float> partial(static_cast<size_t>(threads) * N, 0.f);
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t r0 = M * t / nt, r1 = M * (t + 1) / nt;
    ColumnSumAdd(static_cast<const char*>(z) + r0 * N * (bf16 ? 2 : 4), bf16, r1 - r0, N,
                 partial.data() + static_cast<size_t>(t) * N);
  }
  std::fill(db, db + N, 0.f);
  ColumnSumAdd(partial.data(), false, threads, N, db);
}

}  // namespace mmdit

using namespace mmdit;

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditAdaLnFwd, AdaLnForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditAdaLnBwd, AdaLnBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditGatedResidualBwd, GatedResidualBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditRmsNormFwd, RmsNormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditRmsNormBwd, RmsNormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));
