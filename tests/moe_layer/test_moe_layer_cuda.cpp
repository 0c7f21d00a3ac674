// The MoE layer on the CUDA backend (cuBLAS grouped GEMM, the SwiGLU kernel, NCCL for the TP
// all-reduce), several ranks on one GPU, checked against the same dense reference as the host
// backend. Without a GPU every test skips, saying so.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bench/moe_layer/layer.h"
#include "bench/moe_layer/memory.h"
#include "bench/moe_layer/reference.h"
#include "bench/moe_layer/tp_all_reduce.h"
#include "csrc/plan.h"
#include "tests/common/a2a_case.h"
#include "tests/common/multiprocess.h"
#include "tests/cuda/gpu.h"
#include "tools/common/bootstrap.h"

namespace ferry::moe {
namespace {

using Case = testing::A2aCase;

void expect_cuda_layer_matches_reference(const Case& c, bool ipc) {
  testing::LaunchOptions launch = testing::launch_options(c);
  launch.env["FERRY_CUDA_IPC"] = ipc ? "1" : "0";
  auto results = testing::run_ranks(launch, [&](te::Bootstrap& boot) {
    LayerShape s;
    s.world_size = c.world_size;
    s.num_experts = c.num_experts;
    s.top_k = c.top_k;
    s.hidden = c.hidden;
    s.intermediate = 64;
    s.tokens = c.max_tokens;
    tools::CBootstrap cboot(boot);
    LayerOptions o;
    o.shape = s;
    o.rank = boot.rank();
    o.device = FERRY_DEVICE_CUDA;
    o.cuda_device = 0;
    o.provider = c.provider;
    o.timeout_ms = c.timeout_ms;
    MoeLayer layer(o, cboot.get());

    std::vector<uint16_t> x = attention_partial(s, s.group_of(boot.rank()), s.member_of(boot.rank()));
    Memory x_dev(x.size() * sizeof(uint16_t), true);
    x_dev.upload(x.data(), x_dev.bytes());
    make_nccl_all_reduce(cboot.get(), 1, 0, layer.stream(), c.timeout_ms)->all_reduce_bf16(x_dev.get(), x.size());
    x_dev.download(x.data(), x_dev.bytes());
    const ReferenceOutput want = reference_layer(s, s.group_of(boot.rank()));
    ASSERT_EQ(x, want.x) << "NCCL's all-reduce of one rank must leave the hidden states as they are";
    layer.set_tokens(x.data());
    for (ScheduleKind kind : {ScheduleKind::plain, ScheduleKind::tbo}) {
      SCOPED_TRACE(schedule_name(kind));
      const Schedule schedule = make_schedule(kind);
      layer.run(schedule);
      const int n = num_micro_batches(schedule);
      for (int b = 0; b < n; ++b)
        EXPECT_EQ(layer.expert_counts(b), reference_expert_counts(s, boot.rank(), n, b)) << "micro-batch " << b;
      std::vector<uint8_t> out(size_t(s.tokens) * s.hidden * sizeof(uint16_t));
      layer.download_output(out.data());
      EXPECT_EQ(compare_output(s, want, boot.rank(), 0, out.data(), s.tokens), "");
    }
  });
  testing::expect_all_ok(results);
}

TEST(MoeLayerCuda, TwoRanksOnOneGpuHostStagedMatchDenseReferenceInBothSchedules) {
  FERRY_REQUIRE_GPU();
  Case c;
  c.world_size = 2;
  c.num_experts = 8;
  c.top_k = 4;
  c.max_tokens = 32;
  c.hidden = 256;
  c.provider = "shm";
  expect_cuda_layer_matches_reference(c, false);
}

TEST(MoeLayerCuda, FourRanksOnOneGpuThroughCudaIpcMatchDenseReferenceInBothSchedules) {
  FERRY_REQUIRE_GPU();
  Case c;
  c.world_size = 4;
  c.num_experts = 16;
  c.top_k = 4;
  c.max_tokens = 24;
  c.hidden = 512;
  c.provider = "shm";
  expect_cuda_layer_matches_reference(c, true);
}

}  // namespace
}  // namespace ferry::moe
