// What the oneDNN kernel sources (onednn_kernels.cc, attention_kernels.cc) share: the engine, the
// per-shape primitive cache and the caller-owned scratchpads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "common.h"

namespace mmdit {

using dt = dnnl::memory::data_type;
using Dims = dnnl::memory::dims;

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Primitive creation dispatches over oneDNN's implementations (tens of microseconds); a train step
// calls the same few shapes hundreds of times, so primitives are kept per shape. One cache per call
// site (make's lambda type is part of the instantiation).
template <typename Key, typename Value, typename Make>
const Value& Cached(const Key& key, Make make) {
  static std::mutex mutex;
  static std::map<Key, Value> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  return cache.emplace(key, make()).first->second;
}

// Every primitive takes its scratchpad from the caller. With oneDNN's default (library-managed)
// scratchpad a primitive owns one buffer, and XLA runs independent thunks concurrently: two calls
// of one cached primitive (same shape, e.g. every block's adaLN modulation) then shared it and
// corrupted each other's results, now and then; in fp32 the default config's training diverged
// (loss 1.41 after an epoch against 0.265 on XLA's dots).
inline dnnl::primitive_attr UserScratchpad(float scale = 1.0f) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  if (scale != 1.0f) attr.set_output_scales(0, {scale});
  return attr;
}

// A scratchpad of `bytes` for one call on this thread (the calls of one handler run in order).
inline dnnl::memory ThreadScratchpad(size_t bytes) {
  thread_local std::vector<char> buf;
  if (buf.size() < std::max<size_t>(bytes, 1)) buf.resize(std::max<size_t>(bytes, 1));
  return dnnl::memory(dnnl::memory::desc({static_cast<int64_t>(buf.size())}, dnnl::memory::data_type::u8,
                                         dnnl::memory::format_tag::a),
                      Engine(), buf.data());
}

}  // namespace mmdit
