// One description of an all-to-all test case for the ep and cuda tests: the shape and dtypes, the
// transport, the inputs, how each step is driven, and the deadlines. Every rank builds its config
// from it (config_of), the parent its launch (launch_options); each test keeps its own expectations.
//
//   testing::A2aCase c{.world_size = 4, .num_experts = 8, .provider = "shm"};
//   const ferry_a2a_config_t cfg = testing::config_of(c, rank, FERRY_DEVICE_HOST);
#pragma once
#include <functional>
#include <random>
#include <string>

#include "csrc/reference.h"
#include "ferry/ferry.h"
#include "tests/common/multiprocess.h"

namespace ferry::testing {

struct A2aCase {
  // Shape and dtypes (ferry_a2a_config_t).
  int world_size = 2;
  int num_experts = 4;
  int top_k = 2;
  int max_tokens = 16;
  int hidden = 128;
  ferry_dtype_t in_dtype = FERRY_BF16;
  ferry_dtype_t out_dtype = FERRY_BF16;
  int scale_block = 0;
  int expert_alignment = 1;
  int dp_size = 1;
  int private_tokens = -1;  // -1: automatic
  // How dispatch lays out out_expert_x_scale (with scales). Quantize on dispatch is spec.quantize.
  ferry_scale_layout_t out_scale_layout = FERRY_SCALE_ROW_MAJOR;
  // FERRY_WEIGHTS_AT_COMBINE: dispatch gets no weights (NULL), combine RECV gets the inputs' weights.
  ferry_combine_weights_t combine_weights = FERRY_WEIGHTS_AT_DISPATCH;

  // Transport.
  int nets_per_rank = 1;
  std::string provider = "tcp";
  // CUDA backend only: same-node peers through CUDA IPC (FERRY_CUDA_IPC=1) instead of host-staged
  // buffers moved by the engine (FERRY_CUDA_IPC=0).
  bool ipc = false;
  // Ranks split into this many nodes, contiguous by rank (node_of); 0: the machine's own identity.
  // Only where a test uses it: the CUDA backend tests hand it to the ranks as FERRY_NODE_ID, the
  // direct-peer Protocol tests treat same-node peers as direct.
  int nodes = 0;

  // Inputs and how each step is driven.
  ep::reference::InputSpec spec{};
  int steps = 1;
  bool split = false;       // SEND and RECV as separate calls, with work in between
  int max_skew_ms = 0;      // each rank sleeps up to this long, at random, before each half-step
  bool accumulate = false;  // combine adds into out_tokens instead of overwriting them
  bool bound_m = false;     // dispatch sends the first testing::bound_of(num_tokens) tokens only,
                            // counted by bound_m (device memory for CUDA); combine the same rows

  // Host backend: FERRY_HOST_THREADS for every rank (0: unset, the library sizes its helpers).
  int host_threads = 0;

  // Deadlines.
  int timeout_ms = 30000;          // every wait inside the library (config)
  int launch_timeout_ms = 100000;  // the whole multi-process run; children killed after it
};

// The config rank `rank` creates for the case. With FERRY_DEVICE_CUDA every rank uses GPU 0: these
// tests run all their ranks on one GPU.
ferry_a2a_config_t config_of(const A2aCase& c, int rank, ferry_device_t device);

// run_ranks options for the case: its world size and whole-run deadline, nothing in the environment.
LaunchOptions launch_options(const A2aCase& c);

// The node of `rank` when the case splits its ranks into c.nodes nodes, contiguous by rank.
int node_of(const A2aCase& c, int rank);

// The inputs of one step: the case's spec with a seed of its own per step, so that back-to-back
// steps carry different tokens, and every rank can regenerate every rank's inputs.
ep::reference::InputSpec step_spec(const A2aCase& c, int step);

// Calls one operation (dispatch or combine) the way the case drives it: after a random pause of up
// to max_skew_ms, one SEND_RECV call, or with split a SEND call and a RECV call with another pause
// between them (the caller's work between the halves). Seeded by rank, so a failing run replays.
class HalfStepCaller {
 public:
  HalfStepCaller(const A2aCase& c, int rank);
  void call(const std::function<void(int flags)>& operation);

 private:
  void pause();

  bool split_;
  int max_skew_ms_;
  std::mt19937 random_;
};

}  // namespace ferry::testing
