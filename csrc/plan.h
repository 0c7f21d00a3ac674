// The routing plan and buffer layout of the all-to-all, shared by the host backend and the CUDA
// kernels (__host__ __device__). Pure functions: no I/O, no allocation.
//
// Wire layout (every offset a multiple of 16):
//  record        = RecordHeader (64 B) | payload (hidden * elem) | scales (num_scales * 4) | pad to 16
//  count header  = int32 counts[world_size] (this sender's records per destination rank)
//                | int32 expert_counts[experts_per_rank] (records for each of the destination's local
//                  experts) | pad to 16
//  dispatch send buffer: for each destination d in rank order, [count header | run of count[d]
//                  records ordered by source token]; runs are contiguous (prefix sums of counts).
//  dispatch recv buffer: private region of sender s at s * private_stride = [count header |
//                  private_tokens records]; then the overflow region, where sender s's records
//                  beyond private_tokens land at sum_{s' < s} max(0, count[s'][me] - private_tokens)
//                  records.
//  combine: one partial (hidden * out_elem, padded to 16) per received record travels back to the
//                  source, into the source's combine region at the slot the token had in its send
//                  run: the source already knows that layout.
#pragma once
#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define FERRY_HD __host__ __device__ __forceinline__
#else
#define FERRY_HD inline
#endif

namespace ferry::ep {

constexpr int kMaxTopK = 8;
constexpr int kMaxRanks = 4096;
constexpr uint64_t kAlign = 16;

FERRY_HD uint64_t align_up(uint64_t v, uint64_t a = kAlign) { return (v + a - 1) / a * a; }

struct RecordHeader {
  int32_t src_token;                 // token index on the source rank
  int32_t src_rank;
  int32_t num_routes;                // routes of this token to the receiver's local experts
  int32_t reserved;
  int16_t local_expert[kMaxTopK];    // receiver-local expert index per route
  float weight[kMaxTopK];            // top-k weight per route
};
static_assert(sizeof(RecordHeader) == 64, "record header is 64 bytes on the wire");

// ferry_scale_layout_t values: how a dispatch lays out out_expert_x_scale.
constexpr int kScaleRowMajor = 0, kScaleColumnMajor = 1, kScaleUe8m0ColumnMajor = 2;

FERRY_HD int elem_bytes_of(int ferry_dtype) {
  // FERRY_BF16=0, FERRY_F16=1, FERRY_F32=2, FERRY_FP8_E4M3=3
  return ferry_dtype == 2 ? 4 : ferry_dtype == 3 ? 1 : 2;
}

// Everything the byte movers need, derived once from a validated config.
struct Layout {
  int world_size = 0;
  int rank = 0;
  int num_experts = 0;
  int experts_per_rank = 0;
  int top_k = 0;
  int max_tokens = 0;
  int hidden = 0;
  int in_elem_bytes = 0;
  int out_elem_bytes = 0;
  int scale_block = 0;        // 0: no scales
  int num_scales = 0;         // hidden / scale_block
  int private_tokens = 0;     // records per sender in the private region
  int dp_size = 1;
  int expert_alignment = 1;   // rows per local expert padded to a multiple of this
  int max_rows_per_expert = 0;  // align_up(world_size * max_tokens, expert_alignment)
  int in_dtype = 0;           // ferry_dtype_t values
  int out_dtype = 0;
  // FERRY_WEIGHTS_AT_COMBINE: destinations return each expert row of a record unweighted, so a
  // combine slot (one per record) holds combine_rows = max_routes_per_record() rows; else 1 partial.
  bool weights_at_combine = false;
  int combine_rows = 1;

  uint64_t payload_bytes = 0;       // hidden * in_elem_bytes
  uint64_t scale_bytes = 0;         // num_scales * 4
  uint64_t record_bytes = 0;        // align16(64 + payload + scales)
  uint64_t count_header_bytes = 0;  // align16(4 * (world_size + experts_per_rank))
  uint64_t partial_bytes = 0;       // align16(hidden * out_elem_bytes)

  FERRY_HD uint64_t payload_offset() const { return sizeof(RecordHeader); }
  FERRY_HD uint64_t scale_offset() const { return sizeof(RecordHeader) + payload_bytes; }

  // out_expert_x_scale in each ferry_scale_layout_t (ferry.h). Slots per row: the scales, and with
  // UE8M0 the zero bytes that fill a row's last word.
  FERRY_HD int ue8m0_words() const { return (num_scales + 3) / 4; }
  FERRY_HD int out_scale_slots(int scale_layout) const {
    return scale_layout == kScaleUe8m0ColumnMajor ? 4 * ue8m0_words() : num_scales;
  }
  // Bytes of the whole out_expert_x_scale (every local expert's max_rows_per_expert rows).
  FERRY_HD uint64_t out_scale_buffer_bytes(int scale_layout) const {
    const uint64_t rows = uint64_t(experts_per_rank) * uint64_t(max_rows_per_expert);
    return rows * uint64_t(out_scale_slots(scale_layout)) * (scale_layout == kScaleUe8m0ColumnMajor ? 1u : 4u);
  }
  // Byte offset of slot s of batched row `row` (e * max_rows_per_expert + r).
  FERRY_HD uint64_t out_scale_offset(int scale_layout, int64_t row, int s) const {
    const uint64_t e = uint64_t(row) / uint64_t(max_rows_per_expert), r = uint64_t(row) % uint64_t(max_rows_per_expert);
    switch (scale_layout) {
      case kScaleColumnMajor: return ((e * num_scales + uint64_t(s)) * max_rows_per_expert + r) * 4;
      case kScaleUe8m0ColumnMajor:
        return ((e * ue8m0_words() + uint64_t(s / 4)) * max_rows_per_expert + r) * 4 + uint64_t(s % 4);
      default: return (uint64_t(row) * num_scales + uint64_t(s)) * 4;
    }
  }

  // A token travels at most once to each destination rank.
  FERRY_HD int max_send_records() const {
    return max_tokens * (top_k < world_size ? top_k : world_size);
  }
  FERRY_HD uint64_t send_buffer_bytes() const {
    return world_size * count_header_bytes + uint64_t(max_send_records()) * record_bytes;
  }
  FERRY_HD uint64_t private_stride() const {
    return count_header_bytes + uint64_t(private_tokens) * record_bytes;
  }
  FERRY_HD uint64_t overflow_offset() const { return world_size * private_stride(); }
  FERRY_HD uint64_t overflow_records() const {
    return uint64_t(world_size) * uint64_t(max_tokens > private_tokens ? max_tokens - private_tokens : 0);
  }
  FERRY_HD uint64_t recv_buffer_bytes() const {
    return overflow_offset() + overflow_records() * record_bytes;
  }
  // Most records one rank can receive: each sender sends a token at most once.
  FERRY_HD uint64_t max_recv_records() const { return uint64_t(world_size) * max_tokens; }
  // Combine slot i (a record) starts at i * combine_slot_bytes(): its partial, or its rows.
  FERRY_HD uint64_t combine_slot_bytes() const { return uint64_t(combine_rows) * partial_bytes; }
  FERRY_HD uint64_t combine_send_bytes() const { return max_recv_records() * combine_slot_bytes(); }
  FERRY_HD uint64_t combine_recv_bytes() const { return uint64_t(max_send_records()) * combine_slot_bytes(); }

  // Receive-side row capacity of one destination's count header: ranks then local experts.
  FERRY_HD int max_dests_per_token() const { return top_k < world_size ? top_k : world_size; }
  FERRY_HD int max_routes_per_record() const {
    return top_k < experts_per_rank ? top_k : experts_per_rank;
  }
  FERRY_HD int dp_group(int r) const { return r / dp_size; }
  FERRY_HD int dp_member(int r) const { return r % dp_size; }
  FERRY_HD uint64_t row_bytes() const { return payload_bytes; }
  FERRY_HD uint64_t out_row_bytes() const { return uint64_t(hidden) * out_elem_bytes; }

  // Dispatch send buffer: destination d's section [count header | run] starts after the headers of
  // destinations before it and the records of their runs (records_before = exclusive prefix sum).
  FERRY_HD uint64_t send_section_offset(int dest, int64_t records_before) const {
    return uint64_t(dest) * count_header_bytes + uint64_t(records_before) * record_bytes;
  }
  FERRY_HD uint64_t send_record_offset(int dest, int64_t records_before, int64_t index_in_run) const {
    return send_section_offset(dest, records_before) + count_header_bytes +
           uint64_t(index_in_run) * record_bytes;
  }
  // Dispatch recv buffer: record p of sender s; overflow_before = sum over senders s' < s of
  // max(0, count[s'][me] - private_tokens), which every rank derives from the count matrix.
  FERRY_HD uint64_t recv_private_offset(int sender) const { return uint64_t(sender) * private_stride(); }
  FERRY_HD uint64_t recv_record_offset(int sender, int64_t p, int64_t overflow_before) const {
    return p < private_tokens
               ? recv_private_offset(sender) + count_header_bytes + uint64_t(p) * record_bytes
               : overflow_offset() + uint64_t(overflow_before + p - private_tokens) * record_bytes;
  }
};

// The count header at the start of every destination section: this sender's records per
// destination rank, then per local expert of that destination. A sender whose own step failed
// (bad input) still writes its headers, with kPoisonCount in counts[0], so that its peers fail at
// once naming it instead of waiting for their deadline.
constexpr int32_t kPoisonCount = INT32_MIN;
FERRY_HD int32_t* header_counts(void* header) { return static_cast<int32_t*>(header); }
FERRY_HD int32_t* header_expert_counts(void* header, int world_size) {
  return static_cast<int32_t*>(header) + world_size;
}
FERRY_HD const int32_t* header_counts(const void* header) { return static_cast<const int32_t*>(header); }
FERRY_HD const int32_t* header_expert_counts(const void* header, int world_size) {
  return static_cast<const int32_t*>(header) + world_size;
}

// Expert e lives on rank e / experts_per_rank, as local expert e % experts_per_rank.
FERRY_HD int owner_rank(int expert, int experts_per_rank) { return expert / experts_per_rank; }
FERRY_HD int local_expert(int expert, int experts_per_rank) { return expert % experts_per_rank; }

// Distinct destination ranks of one token, ascending, into out_ranks (at most top_k); -1 routes are
// skipped. Returns how many. Ids must have been validated (0 <= id < num_experts or -1).
FERRY_HD int token_destinations(const int32_t* token_indices, int top_k, int experts_per_rank,
                                int32_t* out_ranks) {
  int n = 0;
  for (int k = 0; k < top_k; ++k) {
    const int e = token_indices[k];
    if (e < 0) continue;
    const int r = owner_rank(e, experts_per_rank);
    int pos = n;
    bool seen = false;
    for (int j = 0; j < n; ++j) {
      if (out_ranks[j] == r) { seen = true; break; }
      if (out_ranks[j] > r) { pos = j; break; }
    }
    if (seen) continue;
    for (int j = n; j > pos; --j) out_ranks[j] = out_ranks[j - 1];
    out_ranks[pos] = r;
    ++n;
  }
  return n;
}

// ---- host-side plan (the reference the CUDA kernels compute in parallel) --------------------------

// Throws Status::invalid_argument naming the token, the route and the value when an expert id is
// outside [0, num_experts) other than -1, or when one token names the same expert twice (its rows
// would collide in the expert-major layout).
void validate_routing(const Layout& layout, const int32_t* indices, int num_tokens);

// What one rank sends in one step. With dp_size > 1 the ranks of a group hold the same tokens and
// member m sends only the tokens t with t % dp_size == m; every member can build every member's
// plan from the shared inputs.
struct SendPlan {
  int num_tokens = 0;
  int member = 0;
  int total_records = 0;
  std::vector<int32_t> dest_count;         // [world_size] records per destination rank
  std::vector<int32_t> dest_expert_count;  // [world_size * experts_per_rank] routes per (dest, local expert)
  std::vector<int64_t> dest_offset;        // [world_size + 1] exclusive prefix sum of dest_count
  std::vector<int32_t> token_num_dests;    // [num_tokens] 0 for tokens another member sends
  std::vector<int32_t> token_dest;         // [num_tokens * max_dests_per_token] ascending ranks
  std::vector<int32_t> token_slot;         // [num_tokens * max_dests_per_token] record index in
                                           // the send buffer (= combine slot), runs by source token
  std::vector<int32_t> slot_token;         // [total_records] inverse of token_slot
  std::vector<int32_t> slot_dest;          // [total_records]
  std::vector<int32_t> slot_routes;        // [total_records] routes of the record (its rows in combine
                                           // with weights at combine)
  std::vector<int32_t> route_row;          // [num_tokens * top_k] with weights at combine, the combine row
                                           // of route k: slot * combine_rows + its position among the
                                           // token's routes to that rank (top-k order); else, and for
                                           // a -1 route, -1
};
// Routing must have been validated.
SendPlan make_send_plan(const Layout& layout, const int32_t* indices, int num_tokens, int member);

// Fills one count header (count_header_bytes) for destination `dest` from a plan.
void write_count_header(const Layout& layout, const SendPlan& plan, int dest, void* header);

// What one rank receives, from the count matrix every rank learns from the count headers.
//  count_matrix[s * world_size + d]: records sender s sends to rank d.
//  expert_counts[s * experts_per_rank + e]: routes from sender s to this rank's local expert e.
struct RecvPlan {
  int total_records = 0;
  std::vector<int32_t> count;             // [world_size] records from each sender
  std::vector<int64_t> record_base;       // [world_size + 1] receive order: sender-major
  std::vector<int64_t> overflow_before;   // [world_size] records of earlier senders in overflow
  std::vector<int32_t> expert_row_base;   // [world_size * experts_per_rank] first row of sender s
  std::vector<int32_t> expert_count;      // [experts_per_rank] rows received per local expert
  std::vector<int32_t> expert_padded;     // [experts_per_rank] expert_count aligned up
};
RecvPlan make_recv_plan(const Layout& layout, const int32_t* count_matrix, const int32_t* expert_counts);

// Checks the count header a sender wrote this rank (count_header_bytes at `header`, any alignment)
// before anything is derived from it: returns "" when it is valid, otherwise what is wrong with it
// (the caller names the sender). Fills counts[world_size] (records per destination rank) and
// expert_counts[experts_per_rank] (this rank's local experts) with what it read.
std::string check_count_header(const Layout& layout, const void* header, int32_t* counts, int32_t* expert_counts);

// Overflow records that senders before `sender` put into rank `dest`'s overflow region.
int64_t overflow_before(const Layout& layout, const int32_t* count_matrix, int sender, int dest);
// Records `sender` sends beyond the private region of `dest`.
FERRY_HD int overflow_count(const Layout& layout, int32_t count) {
  return count > layout.private_tokens ? count - layout.private_tokens : 0;
}
// Combine region layout of every member of a dp group: member j's send slots follow those of
// members j' < j. First combine slot of the records `sender` sent to `dest`.
int64_t combine_slot_base(const Layout& layout, const int32_t* count_matrix, int sender, int dest);

// Checks one received record header against what its sender announced; returns nullptr when valid,
// otherwise a static description of the first violation. prev_src_token is the previous record's
// token from the same sender (-1 for the first): runs are strictly ordered by source token.
FERRY_HD const char* check_record_header(const Layout& layout, const RecordHeader& h, int sender,
                                         int prev_src_token) {
  if (h.src_rank != sender) return "record names another source rank";
  if (h.src_token < 0 || h.src_token >= layout.max_tokens) return "source token index out of range";
  if (h.src_token <= prev_src_token) return "records not ordered by source token";
  if (h.num_routes < 1 || h.num_routes > layout.max_routes_per_record()) return "route count out of range";
  for (int i = 0; i < h.num_routes; ++i) {
    if (h.local_expert[i] < 0 || h.local_expert[i] >= layout.experts_per_rank)
      return "local expert out of range";
    for (int j = 0; j < i; ++j)
      if (h.local_expert[j] == h.local_expert[i]) return "local expert repeated";
  }
  return nullptr;
}

}  // namespace ferry::ep
