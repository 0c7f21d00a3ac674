// Host-side plan: the layout of a checked config, the count-header check, and the routing math the
// host backend executes and the CUDA kernels reproduce in parallel.
#include "csrc/plan.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "csrc/argcheck.h"
#include "csrc/backend.h"
#include "csrc/errors.h"

namespace ferry::ep {

Layout make_layout(const ferry_a2a_config_t& c) {
  check_config(c);
  Layout l;
  l.world_size = c.world_size;
  l.rank = c.rank;
  l.num_experts = c.num_experts;
  l.experts_per_rank = c.num_experts / c.world_size;
  l.top_k = c.experts_per_token;
  l.max_tokens = c.max_tokens_per_rank;
  l.hidden = c.hidden_dim;
  l.in_dtype = enum_value(c.in_dtype);
  l.out_dtype = enum_value(c.out_dtype);
  l.in_elem_bytes = elem_bytes_of(l.in_dtype);
  l.out_elem_bytes = elem_bytes_of(l.out_dtype);
  l.scale_block = c.scale_block;
  l.num_scales = c.scale_block > 0 ? c.hidden_dim / c.scale_block : 0;
  // Automatic: the whole run fits the private region. The receive buffer is world_size *
  // max_tokens records whatever the split (the overflow region shrinks as private grows), so a
  // full private region costs no memory and saves the overflow round trip.
  l.private_tokens = c.private_tokens < 0 ? c.max_tokens_per_rank : c.private_tokens;
  l.dp_size = c.dp_size;
  l.expert_alignment = c.expert_alignment;
  l.max_rows_per_expert = int(align_up(uint64_t(c.world_size) * c.max_tokens_per_rank, c.expert_alignment));
  l.payload_bytes = uint64_t(c.hidden_dim) * l.in_elem_bytes;
  l.scale_bytes = uint64_t(l.num_scales) * 4;
  l.record_bytes = align_up(sizeof(RecordHeader) + l.payload_bytes + l.scale_bytes);
  l.count_header_bytes = align_up(4 * uint64_t(c.world_size + l.experts_per_rank));
  l.partial_bytes = align_up(uint64_t(c.hidden_dim) * l.out_elem_bytes);
  l.weights_at_combine = enum_value(c.combine_weights) == FERRY_WEIGHTS_AT_COMBINE;
  l.combine_rows = l.weights_at_combine ? l.max_routes_per_record() : 1;
  return l;
}

ferry_buffer_sizes_t buffer_sizes_for(const ferry_a2a_config_t& config) {
  const Layout l = make_layout(config);
  ferry_buffer_sizes_t s{};
  s.record_bytes = l.record_bytes;
  s.send_bytes = l.send_buffer_bytes();
  s.recv_bytes = l.recv_buffer_bytes();
  s.combine_send_bytes = l.combine_send_bytes();
  s.combine_recv_bytes = l.combine_recv_bytes();
  s.total_registered_bytes = s.send_bytes + s.recv_bytes + s.combine_send_bytes + s.combine_recv_bytes;
  s.max_rows_per_expert = l.max_rows_per_expert;
  s.num_local_experts = l.experts_per_rank;
  return s;
}

void validate_routing(const Layout& l, const int32_t* indices, int num_tokens) {
  const Site site{l.rank, -1, "dispatch"};
  for (int t = 0; t < num_tokens; ++t) {
    const int32_t* row = indices + int64_t(t) * l.top_k;
    for (int k = 0; k < l.top_k; ++k) {
      const int32_t e = row[k];
      if (e < -1 || e >= l.num_experts)
        fail(Status::invalid_argument, site,
             "indices[" + std::to_string(t) + "][" + std::to_string(k) + "] = " + std::to_string(e) +
                 " outside [0, num_experts=" + std::to_string(l.num_experts) + ") and not -1");
      if (e < 0) continue;
      for (int j = 0; j < k; ++j)
        if (row[j] == e)
          fail(Status::invalid_argument, site,
               "token " + std::to_string(t) + " names expert " + std::to_string(e) + " twice (routes " +
                   std::to_string(j) + " and " + std::to_string(k) + ")");
    }
  }
}

std::string check_count_header(const Layout& l, const void* header, int32_t* counts, int32_t* expert_counts) {
  const int R = l.world_size, epr = l.experts_per_rank;
  // Read through memcpy: the bytes come from a peer, at whatever alignment the caller holds them.
  const auto* bytes = static_cast<const uint8_t*>(header);
  std::memcpy(counts, bytes, sizeof(int32_t) * size_t(R));
  std::memcpy(expert_counts, bytes + sizeof(int32_t) * size_t(R), sizeof(int32_t) * size_t(epr));
  if (counts[0] == kPoisonCount) return "reports that its dispatch failed (invalid input on that rank)";
  for (int d = 0; d < R; ++d)
    if (counts[d] < 0 || counts[d] > l.max_tokens)
      return "claims " + std::to_string(counts[d]) + " records for rank " + std::to_string(d) +
             ", outside [0, max_tokens=" + std::to_string(l.max_tokens) + "]";
  const int32_t mine = counts[l.rank];
  int64_t routes = 0;
  for (int e = 0; e < epr; ++e) {
    if (expert_counts[e] < 0 || expert_counts[e] > mine)
      return "claims " + std::to_string(expert_counts[e]) + " rows for local expert " + std::to_string(e) +
             " out of " + std::to_string(mine) + " records";
    routes += expert_counts[e];
  }
  if (routes < mine || routes > int64_t(mine) * l.max_routes_per_record())
    return "claims " + std::to_string(routes) + " expert rows for " + std::to_string(mine) + " records";
  return {};
}

SendPlan make_send_plan(const Layout& l, const int32_t* indices, int num_tokens, int member) {
  const int R = l.world_size, epr = l.experts_per_rank, md = l.max_dests_per_token();
  SendPlan p;
  p.num_tokens = num_tokens;
  p.member = member;
  p.dest_count.assign(R, 0);
  p.dest_expert_count.assign(size_t(R) * epr, 0);
  p.dest_offset.assign(R + 1, 0);
  p.token_num_dests.assign(num_tokens, 0);
  p.token_dest.assign(size_t(num_tokens) * md, -1);
  p.token_slot.assign(size_t(num_tokens) * md, -1);
  for (int t = member; t < num_tokens; t += l.dp_size) {
    const int32_t* row = indices + int64_t(t) * l.top_k;
    const int n = token_destinations(row, l.top_k, epr, &p.token_dest[size_t(t) * md]);
    p.token_num_dests[t] = n;
    for (int i = 0; i < n; ++i) ++p.dest_count[p.token_dest[size_t(t) * md + i]];
    for (int k = 0; k < l.top_k; ++k)
      if (row[k] >= 0) ++p.dest_expert_count[size_t(owner_rank(row[k], epr)) * epr + local_expert(row[k], epr)];
  }
  for (int d = 0; d < R; ++d) p.dest_offset[d + 1] = p.dest_offset[d] + p.dest_count[d];
  p.total_records = int(p.dest_offset[R]);
  p.slot_token.assign(p.total_records, -1);
  p.slot_dest.assign(p.total_records, -1);
  p.slot_routes.assign(p.total_records, 0);
  p.route_row.assign(size_t(num_tokens) * l.top_k, -1);
  // Tokens in ascending order fill each run, so a run is ordered by source token.
  std::vector<int64_t> next(p.dest_offset.begin(), p.dest_offset.end() - 1);
  for (int t = member; t < num_tokens; t += l.dp_size) {
    for (int i = 0; i < p.token_num_dests[t]; ++i) {
      const int d = p.token_dest[size_t(t) * md + i];
      const int64_t slot = next[d]++;
      p.token_slot[size_t(t) * md + i] = int32_t(slot);
      p.slot_token[slot] = t;
      p.slot_dest[slot] = d;
    }
    // A record lists the token's routes to its rank in top-k order (RecordHeader), and so do its rows.
    const int32_t* row = indices + int64_t(t) * l.top_k;
    for (int k = 0; k < l.top_k; ++k) {
      if (row[k] < 0) continue;
      const int d = owner_rank(row[k], epr);
      int i = 0;
      while (p.token_dest[size_t(t) * md + i] != d) ++i;
      const int32_t slot = p.token_slot[size_t(t) * md + i];
      const int32_t position = p.slot_routes[slot]++;
      if (l.weights_at_combine) p.route_row[size_t(t) * l.top_k + k] = slot * l.combine_rows + position;
    }
  }
  return p;
}

void write_count_header(const Layout& l, const SendPlan& plan, int dest, void* header) {
  auto* bytes = static_cast<uint8_t*>(header);
  std::fill(bytes, bytes + l.count_header_bytes, uint8_t(0));
  std::copy(plan.dest_count.begin(), plan.dest_count.end(), header_counts(header));
  const auto first = plan.dest_expert_count.begin() + int64_t(dest) * l.experts_per_rank;
  std::copy(first, first + l.experts_per_rank, header_expert_counts(header, l.world_size));
}

int64_t overflow_before(const Layout& l, const int32_t* count_matrix, int sender, int dest) {
  int64_t n = 0;
  for (int s = 0; s < sender; ++s) n += overflow_count(l, count_matrix[int64_t(s) * l.world_size + dest]);
  return n;
}

int64_t combine_slot_base(const Layout& l, const int32_t* count_matrix, int sender, int dest) {
  const int R = l.world_size;
  int64_t base = 0;
  for (int j = sender - l.dp_member(sender); j < sender; ++j)
    for (int d = 0; d < R; ++d) base += count_matrix[int64_t(j) * R + d];
  for (int d = 0; d < dest; ++d) base += count_matrix[int64_t(sender) * R + d];
  return base;
}

RecvPlan make_recv_plan(const Layout& l, const int32_t* count_matrix, const int32_t* expert_counts) {
  const int R = l.world_size, epr = l.experts_per_rank, me = l.rank;
  RecvPlan p;
  p.count.assign(R, 0);
  p.record_base.assign(R + 1, 0);
  p.overflow_before.assign(R, 0);
  p.expert_row_base.assign(size_t(R) * epr, 0);
  p.expert_count.assign(epr, 0);
  p.expert_padded.assign(epr, 0);
  int64_t ovf = 0;
  for (int s = 0; s < R; ++s) {
    const int32_t c = count_matrix[int64_t(s) * R + me];
    p.count[s] = c;
    p.record_base[s + 1] = p.record_base[s] + c;
    p.overflow_before[s] = ovf;
    ovf += overflow_count(l, c);
    // Rows of local expert e: source rank major, then the sender's run order (source token).
    for (int e = 0; e < epr; ++e) {
      p.expert_row_base[size_t(s) * epr + e] = p.expert_count[e];
      p.expert_count[e] += expert_counts[size_t(s) * epr + e];
    }
  }
  p.total_records = int(p.record_base[R]);
  for (int e = 0; e < epr; ++e) p.expert_padded[e] = int(align_up(uint64_t(p.expert_count[e]), l.expert_alignment));
  return p;
}

}  // namespace ferry::ep
