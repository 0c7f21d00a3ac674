// The attention-TP all-reduce before the MoE layer: the members of an attention-TP group (ranks
// g*tp .. g*tp+tp-1) sum their partial attention outputs, so every member holds the same hidden
// states, which the all-to-all then treats as one dp group (dp_size = tp).
//   CUDA: NCCL on a TP communicator created from Ferry's bootstrap (csrc/nccl).
//   host: no NCCL; every rank's partial travels through the bootstrap's allgather and each member
//         sums its group's in member order (fp32, rounded once to bf16). Correct, not fast: it is
//         timed and reported apart from the layer step.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "ferry/ferry.h"

namespace ferry::moe {

class TpAllReduce {
 public:
  virtual ~TpAllReduce() = default;
  // In place: `count` bf16 values at `data` (host memory for the host version, device memory for
  // NCCL) become the sum over this rank's TP group. Collective over the whole job: every rank calls
  // it with the same count.
  virtual void all_reduce_bf16(void* data, size_t count) = 0;
  virtual std::string describe() const = 0;
};

// Both take the job's C API bootstrap, the one the all-to-all was created from: the host version
// sums through ferry_bootstrap_allgather, the NCCL one exchanges its ids through it.
std::unique_ptr<TpAllReduce> make_bootstrap_all_reduce(ferry_bootstrap_t bootstrap, int tp_size, int timeout_ms);
// Throws Status::unsupported when built without NCCL. `stream`: the cudaStream_t the layer uses;
// nccl_cpus: the cores NCCL's threads start on (empty: anywhere).
std::unique_ptr<TpAllReduce> make_nccl_all_reduce(ferry_bootstrap_t bootstrap, int tp_size, int cuda_device,
                                                  void* stream, int timeout_ms,
                                                  const std::vector<int>& nccl_cpus = {});

}  // namespace ferry::moe
