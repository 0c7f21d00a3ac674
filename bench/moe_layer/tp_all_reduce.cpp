#include "bench/moe_layer/tp_all_reduce.h"

#include <cstdint>
#include <cstring>
#include <vector>

#include "csrc/dtype.h"
#include "tools/common/bootstrap.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

namespace ferry::moe {

namespace {

class BootstrapAllReduce final : public TpAllReduce {
 public:
  BootstrapAllReduce(ferry_bootstrap_t b, int tp, int timeout_ms) : boot_(b), tp_(tp), timeout_ms_(timeout_ms) {
    tools::check(ferry_bootstrap_rank(b, &rank_), "ferry_bootstrap_rank");
    tools::check(ferry_bootstrap_world_size(b, &world_), "ferry_bootstrap_world_size");
    if (tp < 1 || world_ % tp != 0)
      raise(Status::invalid_argument, "TP size " + std::to_string(tp) + " must divide the world size " +
                                          std::to_string(world_));
  }

  void all_reduce_bf16(void* data, size_t count) override {
    if (tp_ == 1) return;
    const size_t bytes = count * sizeof(uint16_t);
    std::vector<uint16_t> all(count * size_t(world_));
    tools::check(ferry_bootstrap_allgather(boot_, data, bytes, all.data(), timeout_ms_),
                 "ferry_bootstrap_allgather of the TP partials");
    const int first = rank_ / tp_ * tp_;
    auto* out = static_cast<uint16_t*>(data);
    for (size_t i = 0; i < count; ++i) {
      float sum = 0.0f;
      for (int m = 0; m < tp_; ++m) sum += ep::dtype::bf16_to_f32(all[size_t(first + m) * count + i]);
      out[i] = ep::dtype::f32_to_bf16(sum);
    }
  }

  std::string describe() const override {
    return tp_ == 1 ? "none (TP 1)" : tools::format("bootstrap allgather, CPU sum (TP %d)", tp_);
  }

 private:
  ferry_bootstrap_t boot_;
  int tp_;
  int timeout_ms_;
  int rank_ = 0, world_ = 1;
};

}  // namespace

std::unique_ptr<TpAllReduce> make_bootstrap_all_reduce(ferry_bootstrap_t bootstrap, int tp_size, int timeout_ms) {
  return std::make_unique<BootstrapAllReduce>(bootstrap, tp_size, timeout_ms);
}

#if !defined(FERRY_HAVE_NCCL)
std::unique_ptr<TpAllReduce> make_nccl_all_reduce(ferry_bootstrap_t, int, int, void*, int, const std::vector<int>&) {
  raise(Status::unsupported, "the TP all-reduce on CUDA needs NCCL; this build has none");
}
#endif

}  // namespace ferry::moe
