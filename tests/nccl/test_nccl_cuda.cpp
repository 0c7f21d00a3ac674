// NCCL communicators from Ferry's bootstrap on a GPU: they all-reduce, and NCCL's threads stay on
// the cores the split gave them. Without a GPU every test skips, saying so.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "bench/moe_layer/memory.h"
#include "csrc/nccl/communicators.h"
#include "csrc/nccl/cores.h"
#include "tests/common/multiprocess.h"
#include "tests/cuda/gpu.h"

namespace ferry::nccl {
namespace {

using moe::Memory;
using moe::Stream;

// NCCL gives its threads the mask of the thread that initialises it (within the GPU's cores):
// created under a core set, its new threads stay inside it.
TEST(NcclFromBootstrap, TpAndPpCommunicatorsAllReduceAndKeepTheirThreadsOnTheirCores) {
  FERRY_REQUIRE_GPU();
  testing::LaunchOptions launch;
  launch.world_size = 2;
  auto results = testing::run_ranks(launch, [&](te::Bootstrap& boot) {
    const std::vector<int> allowed = allowed_cpus();
    const std::vector<int> cores(allowed.end() - std::min<size_t>(allowed.size(), 2), allowed.end());
    const auto before = process_threads();
    // Two ranks on one GPU: each is its own TP group (TP 1) and its own PP stage (PP 1).
    Communicators comms(boot, {boot.world_size(), 1, 1}, 0, 30000, cores);
    const auto started = new_threads(before, process_threads());
    EXPECT_FALSE(started.empty()) << "NCCL started no thread";
    for (const auto& t : started)
      EXPECT_EQ(common_cpus(t.cpus, cores), t.cpus)
          << "NCCL thread " << t.name << " may run on " << cpu_text(t.cpus) << ", outside " << cpu_text(cores);
    EXPECT_EQ(comms.tp().group().ranks, std::vector<int>{boot.rank()});
    Memory buf(1024 * sizeof(uint16_t), true);
    const std::vector<uint16_t> ones(1024, 0x3f80);  // 1.0 in bf16
    buf.upload(ones.data(), buf.bytes());
    Stream stream(true);
    const ncclResult_t rc = ncclAllReduce(buf.get(), buf.get(), 1024, ncclBfloat16, ncclSum, comms.tp().get(),
                                          static_cast<cudaStream_t>(stream.get()));
    ASSERT_TRUE(rc == ncclSuccess || rc == ncclInProgress) << ncclGetErrorString(rc);
    comms.tp().wait(stream.get(), "ncclAllReduce", 30000);
    std::vector<uint16_t> got(1024);
    buf.download(got.data(), buf.bytes());
    EXPECT_EQ(got, ones);
  });
  testing::expect_all_ok(results);
}

}  // namespace
}  // namespace ferry::nccl
