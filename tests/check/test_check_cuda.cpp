// ferry-check's all-to-all stage on the CUDA backend: four ranks playing two nodes, so same-node
// peers go through CUDA IPC and the others through the transfer engine (shm), every byte of every
// iteration compared with the reference. Needs a GPU; skips without one.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "tests/check/check_process.h"

namespace ferry::testing {
namespace {

using nlohmann::json;

TEST(CheckCuda, FourRanksAsTwoNodesPassOnTheCudaBackend) {
  if (!machine_has_cuda_device()) GTEST_SKIP() << "no CUDA device on this machine";
  const std::string dir = make_temp_dir("cuda-nodes");
  std::vector<std::string> argv = small_check_run("shm", dir + "/report.json");
  argv.insert(argv.end(), {"--local-nodes", "2", "--no-links", "--no-nccl", "--a2a-device", "cuda"});
  const ProcessResult r = run_process(argv, 110000);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("alltoall: cuda backend (--a2a-device cuda)"), std::string::npos) << r.output;
  const json j = json::parse(read_text(dir + "/report.json"));
  EXPECT_EQ(j["summary"]["result"], "PASS");
  ASSERT_EQ(j["alltoall"].size(), 6u);
  for (const json& a : j["alltoall"]) {
    EXPECT_TRUE(a["ok"].get<bool>()) << a.dump();
    EXPECT_EQ(a["device"], "cuda") << a.dump();
    EXPECT_GT(a["bytes_checked"].get<uint64_t>(), 0u);
    EXPECT_GT(a["dispatch_us_p50"].get<double>(), 0);
    EXPECT_GT(a["combine_us_p50"].get<double>(), 0);
  }
}

}  // namespace
}  // namespace ferry::testing
