#include "csrc/host/pack.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "csrc/dtype.h"
#include "csrc/errors.h"

namespace ferry::ep::host {

namespace {

// A part's range, checked: the parts of a call must cover the items there are, no more.
void check_range(const char* what, const char* items, int64_t begin, int64_t end, int64_t count) {
  if (begin < 0 || begin > end || end > count)
    raise(Status::internal, std::string(what) + ": " + items + " [" + std::to_string(begin) + ", " +
                                std::to_string(end) + ") outside the " + std::to_string(count) + " there are");
}

// The fp8 payload and scales of one token, cast from its bf16 row.
void quantize_token(const Layout& l, const uint16_t* x_row, bool round_scale, uint8_t* rec) {
  const int block = l.scale_block;
  for (int b = 0; b < l.num_scales; ++b) {
    const float scale = dtype::quantize_block(x_row + int64_t(b) * block, block, round_scale,
                                              rec + l.payload_offset() + int64_t(b) * block);
    std::memcpy(rec + l.scale_offset() + 4 * uint64_t(b), &scale, 4);
  }
}

}  // namespace

// Token by token, so that a token's payload is read (and with quantize, cast) once whatever the
// number of its destinations.
void pack_dispatch(const Layout& l, const SendPlan& plan, const void* x, const float* x_scale, const int32_t* indices,
                   const float* weights, void* send_buffer, Quantize quantize) {
  pack_count_headers(l, plan, send_buffer);
  pack_dispatch_tokens(l, plan, x, x_scale, indices, weights, send_buffer, quantize, 0, plan.num_tokens);
}

void pack_count_headers(const Layout& l, const SendPlan& plan, void* send_buffer) {
  auto* buf = static_cast<uint8_t*>(send_buffer);
  for (int d = 0; d < l.world_size; ++d)
    write_count_header(l, plan, d, buf + l.send_section_offset(d, plan.dest_offset[d]));
}

void pack_dispatch_tokens(const Layout& l, const SendPlan& plan, const void* x, const float* x_scale,
                          const int32_t* indices, const float* weights, void* send_buffer, Quantize quantize,
                          int64_t t_begin, int64_t t_end) {
  check_range("pack_dispatch", "tokens", t_begin, t_end, plan.num_tokens);
  auto* buf = static_cast<uint8_t*>(send_buffer);
  const int epr = l.experts_per_rank, md = l.max_dests_per_token();
  const uint64_t used = l.scale_offset() + l.scale_bytes;
  for (int t = int(t_begin); t < int(t_end); ++t) {
    const uint8_t* first = nullptr;
    for (int i = 0; i < plan.token_num_dests[t]; ++i) {
      const int d = plan.token_dest[size_t(t) * md + i];
      const int64_t index_in_run = plan.token_slot[size_t(t) * md + i] - plan.dest_offset[d];
      uint8_t* rec = buf + l.send_record_offset(d, plan.dest_offset[d], index_in_run);
      RecordHeader h{};
      h.src_token = t;
      h.src_rank = l.rank;
      for (int k = 0; k < l.top_k; ++k) {
        const int32_t e = indices[int64_t(t) * l.top_k + k];
        if (e < 0 || owner_rank(e, epr) != d) continue;
        h.local_expert[h.num_routes] = int16_t(local_expert(e, epr));
        h.weight[h.num_routes] = weights ? weights[int64_t(t) * l.top_k + k] : 0.0f;  // null: weights at combine
        ++h.num_routes;
      }
      std::memcpy(rec, &h, sizeof h);
      if (first) {
        std::memcpy(rec + l.payload_offset(), first + l.payload_offset(), used - l.payload_offset());
      } else if (quantize.enabled) {
        quantize_token(l, static_cast<const uint16_t*>(x) + int64_t(t) * l.hidden, quantize.round_scale, rec);
      } else {
        std::memcpy(rec + l.payload_offset(), static_cast<const uint8_t*>(x) + uint64_t(t) * l.payload_bytes,
                    l.payload_bytes);
        if (l.num_scales > 0) std::memcpy(rec + l.scale_offset(), x_scale + int64_t(t) * l.num_scales, l.scale_bytes);
      }
      std::memset(rec + used, 0, l.record_bytes - used);
      first = rec;
    }
  }
}

namespace {

// One row's scales (num_scales fp32 at `scales`, any alignment; null: a padding row of zeros) into
// out_expert_x_scale in `scale_layout`.
void store_scales(const Layout& l, int scale_layout, const uint8_t* scales, int64_t row, float* out) {
  if (scale_layout == kScaleRowMajor) {
    if (scales) std::memcpy(out + row * l.num_scales, scales, l.scale_bytes);
    else std::memset(out + row * l.num_scales, 0, l.scale_bytes);
    return;
  }
  for (int s = 0; s < l.out_scale_slots(scale_layout); ++s) {
    float v = 0.0f;
    if (scales && s < l.num_scales) std::memcpy(&v, scales + 4 * s, 4);
    dtype::store_out_scale(out, scale_layout, l.out_scale_offset(scale_layout, row, s), v);
  }
}

}  // namespace

void unpack_dispatch(const Layout& l, const RecvPlan& plan, const void* recv_buffer, int32_t* out_expert_num_tokens,
                     void* out_expert_x, float* out_expert_x_scale, ReceivedRoutes& routes, int scale_layout,
                     int32_t* out_src_token, int32_t* out_num_tokens_per_rank) {
  const auto* buf = static_cast<const uint8_t*>(recv_buffer);
  auto* out_x = static_cast<uint8_t*>(out_expert_x);
  const int R = l.world_size, epr = l.experts_per_rank, K = l.top_k;
  routes.num_routes.assign(plan.total_records, 0);
  routes.row.assign(size_t(plan.total_records) * K, -1);
  routes.weight.assign(size_t(plan.total_records) * K, 0.0f);
  std::vector<int32_t> tally(epr);
  for (int s = 0; s < R; ++s) {
    std::fill(tally.begin(), tally.end(), 0);
    auto limit = [&](int e) {
      const int32_t end = s + 1 < R ? plan.expert_row_base[size_t(s + 1) * epr + e] : plan.expert_count[e];
      return end - plan.expert_row_base[size_t(s) * epr + e];
    };
    auto bad = [&](int64_t p, const std::string& what) {
      fail(Status::peer_failed, {l.rank, -1, "dispatch RECV"},
           "record " + std::to_string(p) + " from rank " + std::to_string(s) + ": " + what);
    };
    int prev_token = -1;
    for (int64_t p = 0; p < plan.count[s]; ++p) {
      const uint8_t* rec = buf + l.recv_record_offset(s, p, plan.overflow_before[s]);
      RecordHeader h;
      std::memcpy(&h, rec, sizeof h);
      if (const char* why = check_record_header(l, h, s, prev_token)) bad(p, why);
      prev_token = h.src_token;
      const int64_t i = plan.record_base[s] + p;
      routes.num_routes[i] = h.num_routes;
      for (int r = 0; r < h.num_routes; ++r) {
        const int e = h.local_expert[r];
        if (tally[e] >= limit(e))
          bad(p, "more rows for local expert " + std::to_string(e) + " than its count header announced (" +
                     std::to_string(limit(e)) + ")");
        const int64_t row = int64_t(e) * l.max_rows_per_expert + plan.expert_row_base[size_t(s) * epr + e] + tally[e]++;
        routes.row[i * K + r] = row;
        routes.weight[i * K + r] = h.weight[r];
        std::memcpy(out_x + row * l.payload_bytes, rec + l.payload_offset(), l.payload_bytes);
        if (l.num_scales > 0) store_scales(l, scale_layout, rec + l.scale_offset(), row, out_expert_x_scale);
        if (out_src_token) out_src_token[row] = h.src_token;
      }
    }
    for (int e = 0; e < epr; ++e) {
      if (tally[e] != limit(e))
        fail(Status::peer_failed, {l.rank, -1, "dispatch RECV"},
             "rank " + std::to_string(s) + " announced " + std::to_string(limit(e)) + " rows for local expert " +
                 std::to_string(e) + " but sent " + std::to_string(tally[e]));
      if (out_num_tokens_per_rank) out_num_tokens_per_rank[size_t(e) * R + s] = tally[e];
    }
  }
  for (int e = 0; e < epr; ++e) {
    out_expert_num_tokens[e] = plan.expert_count[e];
    const int64_t first = int64_t(e) * l.max_rows_per_expert + plan.expert_count[e];
    const int64_t pad = plan.expert_padded[e] - plan.expert_count[e];
    std::memset(out_x + first * l.payload_bytes, 0, pad * l.payload_bytes);
    for (int64_t row = first; row < first + pad && l.num_scales > 0; ++row)
      store_scales(l, scale_layout, nullptr, row, out_expert_x_scale);
  }
}

namespace {

// Weighted sums of whole rows, a chunk of columns at a time: the fp32 accumulator stays in L1 (or
// registers) instead of making a pass over a hidden-sized buffer per route, and each output
// element is rounded once. The arithmetic is the reference's, element by element and in the same
// order (acc = 0, then acc += w * row for each row in turn, then one rounding), so the bytes match
// the reference and the CUDA kernels (which use __fmul_rn/__fadd_rn: no fused multiply-add; this
// file is compiled with -ffp-contract=off for the same reason).
constexpr int64_t kChunk = 512;

// Element storage of each type, so the loops below index typed, non-aliasing pointers (without
// __restrict, GCC guards the vector loop with a runtime overlap test and often ran the scalar one).
template <int Type> struct Elem { using T = uint16_t; };
template <> struct Elem<dtype::kF32> { using T = float; };
template <> struct Elem<dtype::kFp8E4M3> { using T = uint8_t; };

template <int Type>
[[gnu::always_inline]] inline void add_scaled(float* __restrict acc, const typename Elem<Type>::T* __restrict row,
                                              float w, int64_t len) {
  for (int64_t i = 0; i < len; ++i) acc[i] += w * dtype::load(row, Type, i);
}

template <int Type>
[[gnu::always_inline]] inline void store_chunk(typename Elem<Type>::T* __restrict out, const float* __restrict acc,
                                               int64_t len) {
  for (int64_t i = 0; i < len; ++i) dtype::store(out, Type, i, acc[i]);
}

// out = round(initial + sum_r weight[r] * rows[r]) with initial = 0, or the value already in out
// when `accumulate`.
template <int Type>
[[gnu::always_inline]] inline void weighted_sum(void* out, const void* const* rows, const float* weight,
                                                 int num_rows, int64_t hidden, bool accumulate) {
  using T = typename Elem<Type>::T;
  alignas(64) float acc[kChunk];
  for (int64_t c0 = 0; c0 < hidden; c0 += kChunk) {
    const int64_t len = hidden - c0 < kChunk ? hidden - c0 : kChunk;
    for (int64_t i = 0; i < len; ++i) acc[i] = 0.0f;
    if (accumulate) add_scaled<Type>(acc, static_cast<const T*>(out) + c0, 1.0f, len);
    for (int r = 0; r < num_rows; ++r) add_scaled<Type>(acc, static_cast<const T*>(rows[r]) + c0, weight[r], len);
    store_chunk<Type>(static_cast<T*>(out) + c0, acc, len);
  }
}

[[gnu::always_inline]] inline void weighted_sum_of(int type, void* out, const void* const* rows, const float* weight,
                                                   int num_rows, int64_t hidden, bool accumulate) {
  switch (type) {
    case dtype::kBf16: weighted_sum<dtype::kBf16>(out, rows, weight, num_rows, hidden, accumulate); break;
    case dtype::kF16: weighted_sum<dtype::kF16>(out, rows, weight, num_rows, hidden, accumulate); break;
    case dtype::kF32: weighted_sum<dtype::kF32>(out, rows, weight, num_rows, hidden, accumulate); break;
    default: weighted_sum<dtype::kFp8E4M3>(out, rows, weight, num_rows, hidden, accumulate); break;
  }
}

}  // namespace

// The combine halves are the host backend's arithmetic hot spots (several ranks share a CPU, so
// their cost adds up across ranks): one clone per vector width, picked at load time for the CPU.
// Every clone computes the same bytes (no contraction, same order).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FERRY_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FERRY_VECTOR_CLONES
#endif

void pack_combine(const Layout& l, const ReceivedRoutes& routes, const void* expert_y, void* combine_send_buffer) {
  pack_combine_records(l, routes, expert_y, combine_send_buffer, 0, int64_t(routes.num_routes.size()));
}

FERRY_VECTOR_CLONES
void pack_combine_records(const Layout& l, const ReceivedRoutes& routes, const void* expert_y,
                          void* combine_send_buffer, int64_t first, int64_t end) {
  check_range("pack_combine", "records", first, end, int64_t(routes.num_routes.size()));
  auto* buf = static_cast<uint8_t*>(combine_send_buffer);
  const auto* y = static_cast<const uint8_t*>(expert_y);
  const int K = l.top_k;
  const uint64_t row_bytes = l.out_row_bytes();
  if (l.weights_at_combine) {  // the rows themselves, in route order, the slot's rest untouched
    for (size_t i = size_t(first); i < size_t(end); ++i)
      for (int r = 0; r < routes.num_routes[i]; ++r)
        std::memcpy(buf + i * l.combine_slot_bytes() + uint64_t(r) * l.partial_bytes,
                    y + uint64_t(routes.row[i * K + r]) * row_bytes, row_bytes);
    return;
  }
  const void* rows[kMaxTopK];
  for (size_t i = size_t(first); i < size_t(end); ++i) {
    const int n = routes.num_routes[i];
    for (int r = 0; r < n; ++r) rows[r] = y + uint64_t(routes.row[i * K + r]) * row_bytes;
    weighted_sum_of(l.out_dtype, buf + i * l.partial_bytes, rows, &routes.weight[i * K], n, l.hidden, false);
  }
}

void unpack_combine_rows(const Layout& l, const SendPlan& plan, const void* combine_recv_buffer, const float* weights,
                         void* out_tokens, bool accumulate) {
  unpack_combine_rows_tokens(l, plan, combine_recv_buffer, weights, out_tokens, accumulate, 0, plan.num_tokens);
}

FERRY_VECTOR_CLONES
void unpack_combine_rows_tokens(const Layout& l, const SendPlan& plan, const void* combine_recv_buffer,
                                const float* weights, void* out_tokens, bool accumulate, int64_t t_begin,
                                int64_t t_end) {
  check_range("unpack_combine_rows", "tokens", t_begin, t_end, plan.num_tokens);
  const auto* buf = static_cast<const uint8_t*>(combine_recv_buffer);
  const int K = l.top_k;
  const void* rows[kMaxTopK];
  float w[kMaxTopK];
  for (int t = int(t_begin); t < int(t_end); ++t) {
    int n = 0;
    for (int k = 0; k < K; ++k) {
      const int32_t row = plan.route_row[size_t(t) * K + k];
      if (row < 0) continue;
      rows[n] = buf + uint64_t(row) * l.partial_bytes;
      w[n++] = weights[size_t(t) * K + k];
    }
    weighted_sum_of(l.out_dtype, static_cast<uint8_t*>(out_tokens) + uint64_t(t) * l.out_row_bytes(), rows, w, n,
                    l.hidden, accumulate);
  }
}

void unpack_combine(const Layout& l, std::span<const SendPlan> member_plans, const void* combine_recv_buffer,
                    void* out_tokens, bool accumulate) {
  const int64_t tokens = member_plans.empty() ? 0 : member_plans[0].num_tokens;
  unpack_combine_tokens(l, member_plans, combine_recv_buffer, out_tokens, accumulate, 0, tokens);
}

FERRY_VECTOR_CLONES
void unpack_combine_tokens(const Layout& l, std::span<const SendPlan> member_plans, const void* combine_recv_buffer,
                           void* out_tokens, bool accumulate, int64_t t_begin, int64_t t_end) {
  for (const SendPlan& plan : member_plans) check_range("unpack_combine", "tokens", t_begin, t_end, plan.num_tokens);
  const auto* buf = static_cast<const uint8_t*>(combine_recv_buffer);
  const int md = l.max_dests_per_token();
  const void* partials[kMaxTopK];
  const float ones[kMaxTopK] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
  static_assert(kMaxTopK == 8, "one weight per possible destination");
  int64_t base = 0;
  for (const SendPlan& plan : member_plans) {
    // Tokens t of this member (t = member mod dp_size) within [t_begin, t_end).
    const int64_t skip = (t_begin - plan.member + l.dp_size - 1) / l.dp_size;
    for (int64_t t = plan.member + std::max<int64_t>(skip, 0) * l.dp_size; t < t_end; t += l.dp_size) {
      void* out = static_cast<uint8_t*>(out_tokens) + uint64_t(t) * l.out_row_bytes();
      const int n = plan.token_num_dests[t];
      for (int i = 0; i < n; ++i)
        partials[i] = buf + uint64_t(base + plan.token_slot[size_t(t) * md + i]) * l.partial_bytes;
      weighted_sum_of(l.out_dtype, out, partials, ones, n, l.hidden, accumulate);
    }
    base += plan.total_records;
  }
}

}  // namespace ferry::ep::host
