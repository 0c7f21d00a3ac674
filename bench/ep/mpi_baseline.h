// The baseline ferry-bench prints beside ferry: the same exchange with MPI collectives. Dispatch =
// pack the token records per destination rank (a token goes once to each rank holding one of its
// experts: the same records and bytes per destination as ferry), MPI_Alltoall of the counts, then
// MPI_Alltoallv of the records. Combine = per received record the weighted sum of its expert rows
// (ferry's partial, rounded to out_dtype), MPI_Alltoallv of those partials back to their source,
// which sums them per token in fp32 and rounds to out_dtype: the same arithmetic ferry does. Only built with MPI; only run under an MPI launch.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "csrc/host/pack.h"
#include "csrc/plan.h"
#include "ferry/ferry.h"

namespace ferry::bench {

// The Open MPI transport (BTL list, for OMPI_MCA_btl) that moves bytes the way `provider` does, so
// the baseline runs on the same transport as ferry: tcp -> "self,tcp", shm -> "self,vader" (Open
// MPI 5 calls its shared-memory BTL "sm"). Empty for providers without a counterpart BTL (efa,
// verbs: MPI keeps its own choice) and in builds without Open MPI.
std::string matching_btl(const std::string& provider);

// What ferry-bench's local mpirun launch exports so the baseline runs on matching_btl(provider):
// OMPI_MCA_btl, OMPI_MCA_pml=ob1 (the pml that uses BTLs) and, for tcp, the loopback interface
// ferry's tcp uses on one host (Open MPI's tcp BTL skips loopback by default), plus
// FERRY_BENCH_MPI_TRANSPORT so the report can say who chose it. A variable the user set wins
// (and OMPI_MCA_btl of the user means nothing is exported; stderr says so). Empty without a
// matching BTL.
std::vector<std::string> matching_mpi_env(const std::string& provider);
// Who chose the transport the ranks see: "ferry-bench (matches --provider)", "OMPI_MCA_btl of the
// environment" or "MPI's default".
std::string mpi_transport_chooser();

// Which transport MPI really uses, read back from the running library (MPI_T): the BTL selection
// (cvar "btl"), the BTL components that registered (a component the selection excludes registers
// no parameters) and, from those, the BTL ob1 takes for peers on the same host (shared memory beats
// tcp) and on other hosts.
struct MpiTransport {
  std::string library;          // MPI_Get_library_version's first line
  bool open_mpi = false;
  std::string pml_selection;    // cvar "pml" ("" when not Open MPI)
  std::string btl_selection;    // cvar "btl"
  std::vector<std::string> btls;  // registered BTL components
  std::string same_host_btl;    // e.g. "vader", "tcp"; "" unknown
  std::string other_host_btl;   // e.g. "tcp"; "" unknown
  // "tcp" or "shared memory" (or the BTL's name) for the peers this job has: what a reader compares
  // with ferry's provider.
  std::string kind(bool one_host) const;
  std::string describe(bool one_host) const;  // one line for the report
};
// Collective-free; needs MPI initialised. Empty fields where the library does not say.
MpiTransport read_mpi_transport();

// Whether an MPI transport of `kind` (MpiTransport::kind) moves bytes the way `provider` does.
bool transport_matches(const std::string& provider, const std::string& kind);

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
