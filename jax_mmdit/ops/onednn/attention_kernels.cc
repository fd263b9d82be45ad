// XLA:CPU custom calls: softmax attention fused per head on oneDNN primitives, forward and
// backward, on (B, L, H, D) q/k/v, on DiT's packed (B, L, 3, H, D) projection, and over MMDiT's
// two token streams without concatenating them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <omp.h>

#include "onednn_common.h"

using namespace mmdit;

namespace {

// ---- fused attention --------------------------------------------------------------------------
// o = softmax(scale * q k^T) v with q (B, L, H, D), k and v (B, S, H, D), o (B, L, H, D), one dtype
// (float32 or bfloat16): the layout the QKV projection writes, so no transposes around the calls.
// Logits and softmax are float32. The unit of work is one head of one batch element: its L x S
// logits (256 KiB at L = S = 256) stay in the core's cache between the matmul that writes them,
// the softmax and the matmul that reads them, where XLA's version passes ~50 MB of logits through
// memory three times per DiT-S/2 layer at batch 32. Short sequences group several heads per unit
// (batched primitives), so per-call overheads do not dominate. Units run in parallel over OpenMP
// threads, each running single-threaded oneDNN primitives (oneDNN does not nest parallel regions)
// on its own buffers. The backward recomputes the probabilities from q and k (flash-attention style) instead
// of keeping them: no L x S residual per layer, and the float32 probabilities the softmax backward
// needs. Model FLOPs: 4 BHLSD forward, 8 BHLSD backward (+2 BHLSD recomputed).

// heads per unit G, L, S, D, bf16, backward
using AttnKey = std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool>;

// G dense (rows, cols) blocks of rows*cols elements each, read with these strides (a transposed
// view of a dense block swaps them).
dnnl::memory::desc Blocks(int64_t G, int64_t rows, int64_t cols, dt type, int64_t row_stride, int64_t col_stride) {
  return dnnl::memory::desc({G, rows, cols}, type, Dims{rows * cols, row_stride, col_stride});
}


struct AttnPrims {
  // One head's operands, dense in per-thread buffers: oneDNN 2.6 runs bf16 matmuls on AMX
  // (brgemm) only for dense operands; on the strided head views of the (B, *, H, D) arrays it
  // picks a generic gemm ~3x slower. Rows are copied in and out instead (D elements each).
  dnnl::memory::desc q, k_t, v, o, k, s32, p, p_t, v_t;
  dnnl::matmul qk;                     // s32 = scale q k^T
  dnnl::softmax_v2_forward softmax;    // forward: s32 -> p (dtype); backward: s32 -> s32 in place
  dnnl::matmul pv;                     // o = p v
  dnnl::reorder to_dtype;              // backward, bf16: p32 -> p
  dnnl::matmul dv, dp, dq, dk;         // dv = p^T do; dp = do v^T; dq = scale ds k; dk = scale ds^T q
  dnnl::softmax_v2_backward softmax_bwd;  // ds = p * (dp - rowsum(p * dp)), in dtype
  size_t scratch = 0;
};

template <typename PD>
void Track(AttnPrims& a, const PD& pd) {
  a.scratch = std::max(a.scratch, pd.scratchpad_desc().get_size());
}

AttnPrims MakeAttentionPrimitives(const AttnKey& key) {
  auto [G, L, S, D, bf16, backward] = key;
  dt type = bf16 ? dt::bf16 : dt::f32;
  float scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto& eng = Engine();
  AttnPrims a;
  a.q = Blocks(G, L, D, type, D, 1);
  a.k_t = Blocks(G, D, S, type, 1, D);
  a.v = Blocks(G, S, D, type, D, 1);
  a.o = a.q;
  a.s32 = Blocks(G, L, S, dt::f32, S, 1);
  a.p = Blocks(G, L, S, type, S, 1);
  {
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a.q, a.k_t, a.s32), UserScratchpad(scale), eng);
    a.qk = dnnl::matmul(pd);
    Track(a, pd);
  }
  {
    dnnl::memory::desc out = backward ? a.s32 : a.p;
    dnnl::softmax_v2_forward::primitive_desc pd(
        dnnl::softmax_v2_forward::desc(dnnl::prop_kind::forward_training, dnnl::algorithm::softmax_accurate, a.s32, out, 2),
        UserScratchpad(), eng);
    a.softmax = dnnl::softmax_v2_forward(pd);
    Track(a, pd);
    if (backward) {
      a.k = a.v;
      a.p_t = Blocks(G, S, L, type, 1, S);
      a.v_t = a.k_t;
      dnnl::softmax_v2_backward::primitive_desc bpd(
          dnnl::softmax_v2_backward::desc(dnnl::algorithm::softmax_accurate, a.p, a.s32, a.s32, 2),
          UserScratchpad(), eng, pd);
      a.softmax_bwd = dnnl::softmax_v2_backward(bpd);
      Track(a, bpd);
    }
  }
  if (!backward) {
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a.p, a.v, a.o), UserScratchpad(), eng);
    a.pv = dnnl::matmul(pd);
    Track(a, pd);
  } else {
    if (bf16) {
      dnnl::reorder::primitive_desc pd(eng, a.s32, eng, a.p, UserScratchpad());
      a.to_dtype = dnnl::reorder(pd);
      Track(a, pd);
    }
    auto mm = [&](dnnl::matmul& prim, const dnnl::memory::desc& x, const dnnl::memory::desc& y,
                  const dnnl::memory::desc& z, float s) {
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(x, y, z), UserScratchpad(s), eng);
      prim = dnnl::matmul(pd);
      Track(a, pd);
    };
    mm(a.dv, a.p_t, a.o, a.v, 1.0f);    // (S, L) x (L, D): do has q's layout
    mm(a.dp, a.o, a.v_t, a.s32, 1.0f);  // (L, D) x (D, S) -> f32
    mm(a.dq, a.p, a.k, a.q, scale);     // ds (L, S) x (S, D)
    mm(a.dk, a.p_t, a.q, a.k, scale);   // ds^T (S, L) x (L, D)
  }
  return a;
}

const AttnPrims& AttentionPrimitives(const AttnKey& key) {
  return Cached<AttnKey, AttnPrims>(key, [&] { return MakeAttentionPrimitives(key); });
}

// Per-thread buffers: the logits/probabilities in float32, dp, the probabilities (then ds) in the
// compute dtype, one head's dense q/k/v/do and results (the scratchpad is `ThreadScratchpad`'s).
struct ThreadBuffers {
  std::vector<float> s32, dp32;
  std::vector<char> p, q, k, v, d_o, out_q, out_k, out_v;
};

ThreadBuffers& Buffers(int64_t G, int64_t L, int64_t S, int64_t D, size_t elem, bool backward) {
  thread_local ThreadBuffers buf;
  auto grow = [](auto& v, size_t n) {
    if (v.size() < n) v.resize(n);
  };
  size_t ls = static_cast<size_t>(G * L * S), ld = static_cast<size_t>(G * L * D) * elem;
  size_t sd = static_cast<size_t>(G * S * D) * elem;
  grow(buf.s32, ls);
  grow(buf.p, ls * elem);
  grow(buf.q, ld);
  grow(buf.k, sd);
  grow(buf.v, sd);
  grow(buf.out_q, ld);
  if (backward) {
    grow(buf.dp32, ls);
    grow(buf.d_o, ld);
    grow(buf.out_k, sd);
    grow(buf.out_v, sd);
  }
  return buf;
}

struct AttnShape {
  int64_t B, L, S, H, D;
};

ffi::Error CheckAttention(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, AttnShape* shape) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("onednn_attention: q, k, v must be (B, L, H, D)");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type() ||
      (q.element_type() != ffi::F32 && q.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument("onednn_attention: q, k, v must all be float32 or all bfloat16");
  for (int i : {0, 2, 3})
    if (kd[i] != qd[i] || vd[i] != qd[i])
      return ffi::Error::InvalidArgument("onednn_attention: q, k, v differ in batch, heads or head size");
  if (kd[1] != vd[1]) return ffi::Error::InvalidArgument("onednn_attention: k and v lengths differ");
  *shape = {qd[0], qd[1], kd[1], qd[2], qd[3]};
  return ffi::Error::Success();
}

ffi::Error CheckPacked(ffi::AnyBuffer qkv, AttnShape* shape) {
  auto d = qkv.dimensions();
  if (d.size() != 5 || d[2] != 3 || (qkv.element_type() != ffi::F32 && qkv.element_type() != ffi::BF16))
    return ffi::Error::InvalidArgument("onednn_attention_packed: qkv must be (B, L, 3, H, D), float32 or bfloat16");
  *shape = {d[0], d[1], d[1], d[3], d[4]};
  return ffi::Error::Success();
}

// Heads per unit: as many as keep a unit's logits within 256 KiB (one at L = S = 256), dividing
// the B*H heads, while leaving at least 8 units to share between threads.
int64_t HeadsPerUnit(const AttnShape& s) {
  int64_t heads = s.B * s.H;
  int64_t cap = std::max<int64_t>(1, std::min<int64_t>(65536 / std::max<int64_t>(s.L * s.S, 1), heads / 8));
  int64_t G = 1;
  for (int64_t g = 1; g <= cap; ++g)
    if (heads % g == 0) G = g;
  return G;
}

// Runs body(first head, buffers, stream, scratchpad) for each unit of G heads (flat b * H + h
// indices), in parallel.
template <typename Body>
void ForEachUnit(const AttnPrims& a, const AttnShape& s, int64_t G, size_t elem, bool backward, Body body) {
  int64_t units = s.B * s.H / G;
  std::string error;
#pragma omp parallel
  {
    try {
      auto& eng = Engine();
      dnnl::stream stream(eng);
      ThreadBuffers& buf = Buffers(G, s.L, s.S, s.D, elem, backward);
      dnnl::memory scratch = ThreadScratchpad(a.scratch);
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < units; ++u) body(u * G, buf, stream, scratch);
    } catch (const std::exception& e) {
#pragma omp critical
      error = e.what();
    }
  }
  if (!error.empty()) throw std::runtime_error(error);
}

// Where one operand's heads are: a (B, n, H, D) array (slots = 1), or slot `slot` of a packed
// (B, n, slots, H, D) one, the QKV projection's output (and its gradient) as it is, so no split
// copies q, k, v out of it and no concatenate packs their gradients back.
struct HeadView {
  void* base;
  int64_t n, slots = 1, slot = 0;
  // MMDiT's joint attention: the sequence continues with the n2 rows of a second (B, n2, H, D)
  // array (the context stream), so the streams are never concatenated.
  void* base2 = nullptr;
  int64_t n2 = 0;
};

// Copies rows [0, n) of head (b, h) of a (B, n, slots, H, D) array from/to a dense (n, D) block.
void CopyRows(void* base, int64_t n, int64_t slots, int64_t slot, int64_t b, int64_t h, const AttnShape& s,
              size_t elem, char* block, bool to_dense) {
  size_t row = s.D * elem, stride = slots * s.H * s.D * elem;
  char* head = static_cast<char*>(base) + ((b * n * slots + slot) * s.H + h) * s.D * elem;
  for (int64_t i = 0; i < n; ++i) {
    if (to_dense) std::memcpy(block + i * row, head + i * stride, row);
    else std::memcpy(head + i * stride, block + i * row, row);
  }
}

// Copies heads first..first+G-1 (flat b * H + h) of `view` to G dense (n + n2, D) blocks
// (to_dense), or back.
void CopyHeads(const HeadView& view, const AttnShape& s, int64_t first, int64_t G, size_t elem, char* dense,
               bool to_dense) {
  size_t row = s.D * elem;
  for (int64_t g = 0; g < G; ++g) {
    int64_t b = (first + g) / s.H, h = (first + g) % s.H;
    char* block = dense + g * (view.n + view.n2) * row;
    CopyRows(view.base, view.n, view.slots, view.slot, b, h, s, elem, block, to_dense);
    if (view.n2 > 0) CopyRows(view.base2, view.n2, 1, 0, b, h, s, elem, block + view.n * row, to_dense);
  }
}

// What the forward and backward handlers share: primitives, the parallel loop over units, copying
// each unit's q, k, v into its dense buffers, and turning exceptions into FFI errors.
// body(a, G, first, buffers, stream, scratchpad) does the rest of a unit.
template <typename Body>
ffi::Error RunAttention(const char* name, bool backward, const AttnShape& s, bool bf16, const HeadView& q,
                        const HeadView& k, const HeadView& v, Body body) {
  size_t elem = bf16 ? 2 : 4;
  try {
    int64_t G = HeadsPerUnit(s);
    const AttnPrims& a = AttentionPrimitives({G, s.L, s.S, s.D, bf16, backward});
    ForEachUnit(a, s, G, elem, backward, [&](int64_t first, ThreadBuffers& buf, dnnl::stream& stream, dnnl::memory& scratch) {
      CopyHeads(q, s, first, G, elem, buf.q.data(), true);
      CopyHeads(k, s, first, G, elem, buf.k.data(), true);
      CopyHeads(v, s, first, G, elem, buf.v.data(), true);
      body(a, G, first, buf, stream, scratch);
    });
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(name) + ": " + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error RunAttentionForward(const char* name, const AttnShape& s, bool bf16, const HeadView& q,
                               const HeadView& k, const HeadView& v, const HeadView& o) {
  size_t elem = bf16 ? 2 : 4;
  auto& eng = Engine();
  return RunAttention(name, false, s, bf16, q, k, v,
      [&](const AttnPrims& a, int64_t G, int64_t first, ThreadBuffers& buf, dnnl::stream& stream,
          dnnl::memory& scratch) {
    dnnl::memory qm(a.q, eng, buf.q.data()), km(a.k_t, eng, buf.k.data()), vm(a.v, eng, buf.v.data());
    dnnl::memory om(a.o, eng, buf.out_q.data()), sm(a.s32, eng, buf.s32.data()), pm(a.p, eng, buf.p.data());
    a.qk.execute(stream, {{DNNL_ARG_SRC, qm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DST, sm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    a.softmax.execute(stream, {{DNNL_ARG_SRC, sm}, {DNNL_ARG_DST, pm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    a.pv.execute(stream, {{DNNL_ARG_SRC, pm}, {DNNL_ARG_WEIGHTS, vm}, {DNNL_ARG_DST, om}, {DNNL_ARG_SCRATCHPAD, scratch}});
    CopyHeads(o, s, first, G, elem, buf.out_q.data(), false);
  });
}

ffi::Error RunAttentionBackward(const char* name, const AttnShape& s, bool bf16, const HeadView& q,
                                const HeadView& k, const HeadView& v, const HeadView& d_o, const HeadView& dq,
                                const HeadView& dk, const HeadView& dv) {
  size_t elem = bf16 ? 2 : 4;
  auto& eng = Engine();
  return RunAttention(name, true, s, bf16, q, k, v,
      [&](const AttnPrims& a, int64_t G, int64_t first, ThreadBuffers& buf, dnnl::stream& stream,
          dnnl::memory& scratch) {
    CopyHeads(d_o, s, first, G, elem, buf.d_o.data(), true);
    dnnl::memory qm(a.q, eng, buf.q.data()), ktm(a.k_t, eng, buf.k.data()), km(a.k, eng, buf.k.data());
    dnnl::memory vtm(a.v_t, eng, buf.v.data()), dom(a.o, eng, buf.d_o.data());
    dnnl::memory dqm(a.q, eng, buf.out_q.data()), dkm(a.k, eng, buf.out_k.data()), dvm(a.v, eng, buf.out_v.data());
    dnnl::memory p32(a.s32, eng, buf.s32.data()), dp32(a.s32, eng, buf.dp32.data());
    // p in the compute dtype: a copy for bf16, the float32 probabilities themselves for f32.
    void* p_data = bf16 ? static_cast<void*>(buf.p.data()) : static_cast<void*>(buf.s32.data());
    dnnl::memory pm(a.p, eng, p_data), ptm(a.p_t, eng, p_data);
    // ds reuses the compute-dtype p buffer: dv has consumed p by then (float32 dp and p32 are
    // the softmax backward's inputs, so they cannot take it).
    dnnl::memory dsm(a.p, eng, buf.p.data()), dstm(a.p_t, eng, buf.p.data());
    a.qk.execute(stream, {{DNNL_ARG_SRC, qm}, {DNNL_ARG_WEIGHTS, ktm}, {DNNL_ARG_DST, p32}, {DNNL_ARG_SCRATCHPAD, scratch}});
    a.softmax.execute(stream, {{DNNL_ARG_SRC, p32}, {DNNL_ARG_DST, p32}, {DNNL_ARG_SCRATCHPAD, scratch}});
    if (bf16) a.to_dtype.execute(stream, {{DNNL_ARG_FROM, p32}, {DNNL_ARG_TO, pm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    a.dv.execute(stream, {{DNNL_ARG_SRC, ptm}, {DNNL_ARG_WEIGHTS, dom}, {DNNL_ARG_DST, dvm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    a.dp.execute(stream, {{DNNL_ARG_SRC, dom}, {DNNL_ARG_WEIGHTS, vtm}, {DNNL_ARG_DST, dp32}, {DNNL_ARG_SCRATCHPAD, scratch}});
    a.softmax_bwd.execute(stream, {{DNNL_ARG_DST, p32}, {DNNL_ARG_DIFF_DST, dp32}, {DNNL_ARG_DIFF_SRC, dsm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    a.dq.execute(stream, {{DNNL_ARG_SRC, dsm}, {DNNL_ARG_WEIGHTS, km}, {DNNL_ARG_DST, dqm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    a.dk.execute(stream, {{DNNL_ARG_SRC, dstm}, {DNNL_ARG_WEIGHTS, qm}, {DNNL_ARG_DST, dkm}, {DNNL_ARG_SCRATCHPAD, scratch}});
    CopyHeads(dq, s, first, G, elem, buf.out_q.data(), false);
    CopyHeads(dk, s, first, G, elem, buf.out_k.data(), false);
    CopyHeads(dv, s, first, G, elem, buf.out_v.data(), false);
  });
}

ffi::Error AttentionForward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> o) {
  AttnShape s;
  if (auto err = CheckAttention(q, k, v, &s); !err.success()) return err;
  return RunAttentionForward("onednn_attention_fwd", s, q.element_type() == ffi::BF16, {q.untyped_data(), s.L},
                             {k.untyped_data(), s.S}, {v.untyped_data(), s.S}, {o->untyped_data(), s.L});
}

ffi::Error AttentionBackward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer d_o,
                             ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                             ffi::Result<ffi::AnyBuffer> dv) {
  AttnShape s;
  if (auto err = CheckAttention(q, k, v, &s); !err.success()) return err;
  if (d_o.element_type() != q.element_type() || d_o.dimensions().size() != 4)
    return ffi::Error::InvalidArgument("onednn_attention_bwd: do must be like q");
  return RunAttentionBackward("onednn_attention_bwd", s, q.element_type() == ffi::BF16, {q.untyped_data(), s.L},
                              {k.untyped_data(), s.S}, {v.untyped_data(), s.S}, {d_o.untyped_data(), s.L},
                              {dq->untyped_data(), s.L}, {dk->untyped_data(), s.S}, {dv->untyped_data(), s.S});
}

// MMDiT's joint attention over two token streams without concatenating them: q, k, v of the
// image stream (B, L, H, D) and of the context stream (B, T, H, D) form one sequence of L + T
// tokens (image first); the outputs and gradients come back per stream.
ffi::Error CheckJoint(ffi::AnyBuffer qx, ffi::AnyBuffer kx, ffi::AnyBuffer vx, ffi::AnyBuffer qc, ffi::AnyBuffer kc,
                      ffi::AnyBuffer vc, AttnShape* shape, int64_t* Lx, int64_t* Lc) {
  AttnShape sx, sc;
  if (auto err = CheckAttention(qx, kx, vx, &sx); !err.success()) return err;
  if (auto err = CheckAttention(qc, kc, vc, &sc); !err.success()) return err;
  if (sx.L != sx.S || sc.L != sc.S || sx.B != sc.B || sx.H != sc.H || sx.D != sc.D ||
      qx.element_type() != qc.element_type())
    return ffi::Error::InvalidArgument("onednn_attention_joint: the streams differ in batch, heads, head size or dtype");
  *Lx = sx.L;
  *Lc = sc.L;
  *shape = {sx.B, sx.L + sc.L, sx.L + sc.L, sx.H, sx.D};
  return ffi::Error::Success();
}

ffi::Error AttentionJointForward(ffi::AnyBuffer qx, ffi::AnyBuffer kx, ffi::AnyBuffer vx, ffi::AnyBuffer qc,
                                 ffi::AnyBuffer kc, ffi::AnyBuffer vc, ffi::Result<ffi::AnyBuffer> ox,
                                 ffi::Result<ffi::AnyBuffer> oc) {
  AttnShape s;
  int64_t Lx, Lc;
  if (auto err = CheckJoint(qx, kx, vx, qc, kc, vc, &s, &Lx, &Lc); !err.success()) return err;
  auto joint = [&](void* x, void* c) { return HeadView{x, Lx, 1, 0, c, Lc}; };
  return RunAttentionForward("onednn_attention_joint_fwd", s, qx.element_type() == ffi::BF16,
                             joint(qx.untyped_data(), qc.untyped_data()), joint(kx.untyped_data(), kc.untyped_data()),
                             joint(vx.untyped_data(), vc.untyped_data()),
                             joint(ox->untyped_data(), oc->untyped_data()));
}

ffi::Error AttentionJointBackward(ffi::AnyBuffer qx, ffi::AnyBuffer kx, ffi::AnyBuffer vx, ffi::AnyBuffer qc,
                                  ffi::AnyBuffer kc, ffi::AnyBuffer vc, ffi::AnyBuffer dox, ffi::AnyBuffer doc,
                                  ffi::Result<ffi::AnyBuffer> dqx, ffi::Result<ffi::AnyBuffer> dkx,
                                  ffi::Result<ffi::AnyBuffer> dvx, ffi::Result<ffi::AnyBuffer> dqc,
                                  ffi::Result<ffi::AnyBuffer> dkc, ffi::Result<ffi::AnyBuffer> dvc) {
  AttnShape s;
  int64_t Lx, Lc;
  if (auto err = CheckJoint(qx, kx, vx, qc, kc, vc, &s, &Lx, &Lc); !err.success()) return err;
  if (dox.element_type() != qx.element_type() || doc.element_type() != qx.element_type() ||
      dox.element_count() != qx.element_count() || doc.element_count() != qc.element_count())
    return ffi::Error::InvalidArgument("onednn_attention_joint_bwd: do of each stream must be like its q");
  auto joint = [&](void* x, void* c) { return HeadView{x, Lx, 1, 0, c, Lc}; };
  return RunAttentionBackward(
      "onednn_attention_joint_bwd", s, qx.element_type() == ffi::BF16, joint(qx.untyped_data(), qc.untyped_data()),
      joint(kx.untyped_data(), kc.untyped_data()), joint(vx.untyped_data(), vc.untyped_data()),
      joint(dox.untyped_data(), doc.untyped_data()), joint(dqx->untyped_data(), dqc->untyped_data()),
      joint(dkx->untyped_data(), dkc->untyped_data()), joint(dvx->untyped_data(), dvc->untyped_data()));
}

// Self-attention on the packed projection: qkv (B, L, 3, H, D) -> o (B, L, H, D), and the
// backward's dqkv like qkv.
ffi::Error AttentionPackedForward(ffi::AnyBuffer qkv, ffi::Result<ffi::AnyBuffer> o) {
  AttnShape s;
  if (auto err = CheckPacked(qkv, &s); !err.success()) return err;
  void* p = qkv.untyped_data();
  return RunAttentionForward("onednn_attention_packed_fwd", s, qkv.element_type() == ffi::BF16, {p, s.L, 3, 0},
                             {p, s.L, 3, 1}, {p, s.L, 3, 2}, {o->untyped_data(), s.L});
}

ffi::Error AttentionPackedBackward(ffi::AnyBuffer qkv, ffi::AnyBuffer d_o, ffi::Result<ffi::AnyBuffer> dqkv) {
  AttnShape s;
  if (auto err = CheckPacked(qkv, &s); !err.success()) return err;
  if (d_o.element_type() != qkv.element_type() || d_o.element_count() * 3 != qkv.element_count())
    return ffi::Error::InvalidArgument("onednn_attention_packed_bwd: do must be (B, L, H, D) in qkv's dtype");
  void *p = qkv.untyped_data(), *d = dqkv->untyped_data();
  return RunAttentionBackward("onednn_attention_packed_bwd", s, qkv.element_type() == ffi::BF16, {p, s.L, 3, 0},
                              {p, s.L, 3, 1}, {p, s.L, 3, 2}, {d_o.untyped_data(), s.L}, {d, s.L, 3, 0},
                              {d, s.L, 3, 1}, {d, s.L, 3, 2});
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnAttentionFwd, AttentionForward, (AnyBuffers<3, 1>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnAttentionBwd, AttentionBackward, (AnyBuffers<4, 3>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnAttentionPackedFwd, AttentionPackedForward, (AnyBuffers<1, 1>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnAttentionPackedBwd, AttentionPackedBackward, (AnyBuffers<2, 1>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnAttentionJointFwd, AttentionJointForward, (AnyBuffers<6, 2>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditOnednnAttentionJointBwd, AttentionJointBackward, (AnyBuffers<8, 6>()));
