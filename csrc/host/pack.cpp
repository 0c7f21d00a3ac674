#include "csrc/host/pack.h"

#include <cstring>
#include <string>

#include "csrc/dtype.h"
#include "transfer_engine/error.h"

namespace ferry::ep::host {

void pack_dispatch(const Layout& l, const SendPlan& plan, const void* x, const float* x_scale, const int32_t* indices,
                   const float* weights, void* send_buffer) {
  auto* buf = static_cast<uint8_t*>(send_buffer);
  const int R = l.world_size, epr = l.experts_per_rank;
  for (int d = 0; d < R; ++d) write_count_header(l, plan, d, buf + l.send_section_offset(d, plan.dest_offset[d]));
  for (int slot = 0; slot < plan.total_records; ++slot) {
    const int t = plan.slot_token[slot], d = plan.slot_dest[slot];
    const int64_t index_in_run = slot - plan.dest_offset[d];
    uint8_t* rec = buf + l.send_record_offset(d, plan.dest_offset[d], index_in_run);
    RecordHeader h{};
    h.src_token = t;
    h.src_rank = l.rank;
    for (int k = 0; k < l.top_k; ++k) {
      const int32_t e = indices[int64_t(t) * l.top_k + k];
      if (e < 0 || owner_rank(e, epr) != d) continue;
      h.local_expert[h.num_routes] = int16_t(local_expert(e, epr));
      h.weight[h.num_routes] = weights[int64_t(t) * l.top_k + k];
      ++h.num_routes;
    }
    std::memcpy(rec, &h, sizeof h);
    std::memcpy(rec + l.payload_offset(), static_cast<const uint8_t*>(x) + uint64_t(t) * l.payload_bytes, l.payload_bytes);
    if (l.num_scales > 0)
      std::memcpy(rec + l.scale_offset(), x_scale + int64_t(t) * l.num_scales, l.scale_bytes);
    const uint64_t used = l.scale_offset() + l.scale_bytes;
    std::memset(rec + used, 0, l.record_bytes - used);
  }
}

void unpack_dispatch(const Layout& l, const RecvPlan& plan, const void* recv_buffer, int32_t* out_expert_num_tokens,
                     void* out_expert_x, float* out_expert_x_scale, ReceivedRoutes& routes) {
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
      raise(Status::peer_failed, "rank " + std::to_string(l.rank) + " dispatch: record " + std::to_string(p) +
                                     " from rank " + std::to_string(s) + ": " + what);
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
        if (l.num_scales > 0) std::memcpy(out_expert_x_scale + row * l.num_scales, rec + l.scale_offset(), l.scale_bytes);
      }
    }
    for (int e = 0; e < epr; ++e)
      if (tally[e] != limit(e))
        raise(Status::peer_failed, "rank " + std::to_string(l.rank) + " dispatch: rank " + std::to_string(s) +
                                       " announced " + std::to_string(limit(e)) + " rows for local expert " +
                                       std::to_string(e) + " but sent " + std::to_string(tally[e]));
  }
  for (int e = 0; e < epr; ++e) {
    out_expert_num_tokens[e] = plan.expert_count[e];
    const int64_t first = int64_t(e) * l.max_rows_per_expert + plan.expert_count[e];
    const int64_t pad = plan.expert_padded[e] - plan.expert_count[e];
    std::memset(out_x + first * l.payload_bytes, 0, pad * l.payload_bytes);
    if (l.num_scales > 0) std::memset(out_expert_x_scale + first * l.num_scales, 0, pad * l.scale_bytes);
  }
}

void pack_combine(const Layout& l, const ReceivedRoutes& routes, const void* expert_y, void* combine_send_buffer) {
  auto* buf = static_cast<uint8_t*>(combine_send_buffer);
  const auto* y = static_cast<const uint8_t*>(expert_y);
  const int K = l.top_k;
  const uint64_t row_bytes = l.out_row_bytes();
  std::vector<float> acc(l.hidden);
  for (size_t i = 0; i < routes.num_routes.size(); ++i) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int r = 0; r < routes.num_routes[i]; ++r) {
      const void* yr = y + uint64_t(routes.row[i * K + r]) * row_bytes;
      dtype::axpy_row(acc.data(), yr, l.out_dtype, routes.weight[i * K + r], l.hidden);
    }
    dtype::store_row(buf + i * l.partial_bytes, l.out_dtype, acc.data(), l.hidden);
  }
}

void unpack_combine(const Layout& l, std::span<const SendPlan> member_plans, const void* combine_recv_buffer,
                    void* out_tokens, bool accumulate) {
  const auto* buf = static_cast<const uint8_t*>(combine_recv_buffer);
  const int md = l.max_dests_per_token();
  std::vector<float> acc(l.hidden);
  int64_t base = 0;
  for (const SendPlan& plan : member_plans) {
    for (int t = plan.member; t < plan.num_tokens; t += l.dp_size) {
      void* out = static_cast<uint8_t*>(out_tokens) + uint64_t(t) * l.out_row_bytes();
      if (accumulate)
        dtype::load_row(acc.data(), out, l.out_dtype, l.hidden);
      else
        std::fill(acc.begin(), acc.end(), 0.0f);
      for (int i = 0; i < plan.token_num_dests[t]; ++i) {
        const void* partial = buf + uint64_t(base + plan.token_slot[size_t(t) * md + i]) * l.partial_bytes;
        dtype::axpy_row(acc.data(), partial, l.out_dtype, 1.0f, l.hidden);
      }
      dtype::store_row(out, l.out_dtype, acc.data(), l.hidden);
    }
    base += plan.total_records;
  }
}

}  // namespace ferry::ep::host
