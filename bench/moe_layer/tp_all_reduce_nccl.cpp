// The attention-TP all-reduce on CUDA: NCCL on the TP communicator of ferry::nccl::Communicators,
// which came from the same bootstrap as the all-to-all.
#include <nccl.h>

#include <memory>

#include "bench/moe_layer/tp_all_reduce.h"
#include "csrc/nccl/communicators.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

namespace ferry::moe {

namespace {

class NcclAllReduce final : public TpAllReduce {
 public:
  NcclAllReduce(ferry_bootstrap_t boot, int tp, int cuda_device, void* stream, int timeout_ms,
                const std::vector<int>& nccl_cpus)
      : comms_(boot, nccl::ParallelLayout{0, tp, 1}, cuda_device, timeout_ms, nccl_cpus),
        stream_(stream),
        timeout_ms_(timeout_ms) {}

  void all_reduce_bf16(void* data, size_t count) override {
    nccl::Communicator& c = comms_.tp();
    const ncclResult_t rc =
        ncclAllReduce(data, data, count, ncclBfloat16, ncclSum, c.get(), static_cast<cudaStream_t>(stream_));
    if (rc != ncclSuccess && rc != ncclInProgress)
      raise(Status::transport, "ncclAllReduce on " + c.name() + ": " + ncclGetErrorString(rc));
    c.wait(stream_, "ncclAllReduce", timeout_ms_);
  }

  std::string describe() const override {
    return tools::format("NCCL all-reduce on the TP communicator (TP %d), from Ferry's bootstrap",
                         int(comms_.tp().group().ranks.size()));
  }

 private:
  nccl::Communicators comms_;
  void* stream_;
  int timeout_ms_;
};

}  // namespace

std::unique_ptr<TpAllReduce> make_nccl_all_reduce(ferry_bootstrap_t bootstrap, int tp_size, int cuda_device, void* stream,
                                                  int timeout_ms, const std::vector<int>& nccl_cpus) {
  return std::make_unique<NcclAllReduce>(bootstrap, tp_size, cuda_device, stream, timeout_ms, nccl_cpus);
}

}  // namespace ferry::moe
