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
#include <cstdint>

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

  uint64_t payload_bytes = 0;       // hidden * in_elem_bytes
  uint64_t scale_bytes = 0;         // num_scales * 4
  uint64_t record_bytes = 0;        // align16(64 + payload + scales)
  uint64_t count_header_bytes = 0;  // align16(4 * (world_size + experts_per_rank))
  uint64_t partial_bytes = 0;       // align16(hidden * out_elem_bytes)

  FERRY_HD uint64_t payload_offset() const { return sizeof(RecordHeader); }
  FERRY_HD uint64_t scale_offset() const { return sizeof(RecordHeader) + payload_bytes; }

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
  FERRY_HD uint64_t combine_send_bytes() const { return max_recv_records() * partial_bytes; }
  FERRY_HD uint64_t combine_recv_bytes() const { return uint64_t(max_send_records()) * partial_bytes; }
};

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

}  // namespace ferry::ep
