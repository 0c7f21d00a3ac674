// One MoE layer on one rank: the router, one Ferry all-to-all handle per micro-batch (each with its
// expert-major buffers), and the grouped GEMM; a step runs a Schedule (schedule.h) over them.
//
// Two micro-batches in flight need two handles: Ferry's protocol allows one step in flight per
// handle (dispatch SEND, dispatch RECV, combine SEND, combine RECV, strictly alternating; a second
// SEND before the RECV is refused). Each handle has its own transfer engine (NIC endpoints, worker
// thread, registered buffers) on the same bootstrap; creating them one after the other on every rank
// keeps the bootstrap's collectives in step. Handle 0 is sized for a whole step's tokens (the plain
// schedule runs on it), handle 1 for the second micro-batch; buffer_sizes(b) says what each costs.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench/moe_layer/grouped_gemm.h"
#include "bench/moe_layer/memory.h"
#include "bench/moe_layer/model.h"
#include "bench/moe_layer/router.h"
#include "bench/moe_layer/schedule.h"
#include "csrc/nccl/cores.h"
#include "ferry/ferry.h"

namespace ferry::moe {

struct LayerOptions {
  LayerShape shape;
  int rank = 0;
  ferry_device_t device = FERRY_DEVICE_HOST;
  int cuda_device = 0;
  std::string provider;      // empty: FERRY_PROVIDER or tcp
  int nets_per_rank = 1;
  int timeout_ms = 30000;    // every wait inside Ferry
  int micro_batches = 2;     // handles to create: 1 runs only the plain schedule
  int gemm_threads = 1;      // host grouped GEMM
  // Cores the handles' threads (engine workers, CUDA proxies) and the host GEMM's threads start on
  // (csrc/nccl/cores.h); empty: wherever the process may run.
  std::vector<int> ferry_cpus, gemm_cpus;
};

class MoeLayer {
 public:
  // Collective: every rank of the bootstrap creates its layer at the same time.
  MoeLayer(const LayerOptions& options, ferry_bootstrap_t bootstrap);
  ~MoeLayer();
  MoeLayer(const MoeLayer&) = delete;
  MoeLayer& operator=(const MoeLayer&) = delete;

  // This step's hidden states (after the TP all-reduce): [tokens][hidden] bf16 bits in host memory.
  // Routes them on the host and copies tokens, indices and weights where the backend reads them.
  void set_tokens(const uint16_t* x);

  // Runs the schedule's operations in order. A failing operation throws ferry::Error naming it
  // ("op 5 of DS0 DR0 ...: combine SEND of micro-batch 1: <Ferry's error>"); a schedule that leaves
  // a micro-batch's step unfinished (its combine RECV never ran) throws Status::invalid_argument.
  // Micro-batch b of a schedule of n covers micro_batch_range(tokens, n, b) and runs on handle b.
  void run(const Schedule& schedule);

  // [tokens][hidden] out_dtype, into host memory.
  void download_output(void* out) const;
  // Rows per local expert of micro-batch b's last dispatch (host copy).
  const std::vector<int32_t>& expert_counts(int b) const { return batches_[size_t(b)].host_counts; }
  ferry_buffer_sizes_t buffer_sizes(int b) const;
  int num_handles() const { return int(batches_.size()); }
  // Floating-point operations of the GEMMs of the last schedule run.
  double last_gemm_flops() const { return last_gemm_flops_; }
  std::string gemm_description() const { return gemm_->describe(); }
  const Router& router() const { return router_; }
  // The threads the handles started (engine workers, CUDA proxies) and those of the host GEMM, with
  // the CPUs each may run on, as read when they were created.
  const std::vector<nccl::ThreadInfo>& ferry_threads() const { return ferry_threads_; }
  const std::vector<nccl::ThreadInfo>& gemm_threads() const { return gemm_threads_; }
  void* stream() const { return stream_.get(); }  // cudaStream_t of the CUDA backend, else null

 private:
  // One handle and the buffers its step writes, in the backend's memory.
  struct Batch {
    ferry_a2a_t a2a = nullptr;
    ferry_buffer_sizes_t sizes{};
    Memory counts, expert_x, expert_y;
    std::vector<int32_t> host_counts;
    int calls = 0;  // halves called in the current schedule (0..4)
  };
  void call(const Op& op, int num_batches);

  LayerOptions o_;
  Router router_;
  Stream stream_;
  std::vector<Batch> batches_;
  // The step's tokens, routes and output: [tokens][...], micro-batches at their token offsets.
  Memory x_, indices_, weights_, out_;
  std::unique_ptr<GroupedGemm> gemm_;
  double last_gemm_flops_ = 0;
  std::vector<nccl::ThreadInfo> ferry_threads_, gemm_threads_;
};

}  // namespace ferry::moe
