// The baseline ferry-bench prints beside ferry: the same exchange with MPI collectives. Dispatch =
// pack the token records per destination rank (a token goes once to each rank holding one of its
// experts: the same records and bytes per destination as ferry), MPI_Alltoall of the counts, then
// MPI_Alltoallv of the records. Combine = per received record the weighted sum of its expert rows
// (ferry's partial, rounded to out_dtype), MPI_Alltoallv of those partials back to their source,
// which sums them per token in fp32 and rounds to out_dtype: the same arithmetic ferry does. Only built with MPI; only run under an MPI launch.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "csrc/host/pack.h"
#include "csrc/plan.h"
#include "ferry/ferry.h"

namespace ferry::bench {

struct BaselineShape {
  int rank = 0;
  int world_size = 1;
  int num_experts = 0;
  int topk = 1;
  int hidden = 0;
  int dp_size = 1;
  uint64_t record_bytes = 0;   // ferry's record: header + payload + scales, padded
  uint64_t payload_bytes = 0;  // hidden * in element
  uint64_t scale_bytes = 0;
  uint64_t partial_bytes = 0;  // one combine partial
  ferry_dtype_t out_dtype = FERRY_BF16;
};

class MpiBaseline {
 public:
  explicit MpiBaseline(const BaselineShape& shape, int max_tokens);
  ~MpiBaseline();
  // Both return the elapsed microseconds of this rank's call.
  double dispatch(const int32_t* indices, const float* weights, const uint8_t* x, const float* x_scale,
                  int num_tokens);
  // Between dispatch and combine, untimed: the experts' output rows (out_dtype) that combine
  // reduces, as ferry-bench's expert_y.
  void produce_expert_output();
  // out_tokens: [num_tokens][hidden] out_dtype.
  double combine(void* out_tokens);
  uint64_t last_dispatch_bytes_sent() const { return dispatch_bytes_sent_; }
  uint64_t last_combine_bytes_sent() const { return combine_bytes_sent_; }
  void barrier();

  // Whether MPI is initialised in this process (the caller initialises it under an MPI launch).
  static bool available();

 private:
  void unpack_expert_major();
  BaselineShape s_;
  int num_tokens_ = 0;
  std::vector<uint8_t> send_, recv_, partial_send_, partial_recv_, expert_rows_;
  std::vector<int> send_counts_, recv_counts_, send_displs_, recv_displs_;
  std::vector<int> send_bytes_, recv_bytes_, send_bytes_displs_, recv_bytes_displs_;
  std::vector<int32_t> slot_token_;  // send slot -> source token, for the combine sum
  int num_rows_ = 0;                 // expert rows filled by the last dispatch
  ep::host::ReceivedRoutes routes_;  // per received record: its rows and weights
  ep::SendPlan token_plan_;          // per source token: its send slots, in destination order
  std::vector<uint8_t> expert_y_;
  uint64_t dispatch_bytes_sent_ = 0, combine_bytes_sent_ = 0;
};

// Initialises MPI for the life of the object when `under_mpi`, and finalises it at the end, unless
// an exception is leaving the rank (then finalizing could wait forever for the peer that failed).
class MpiSession {
 public:
  explicit MpiSession(bool under_mpi);
  ~MpiSession();
  bool active() const { return active_; }

 private:
  bool active_ = false;
};

}  // namespace ferry::bench
