// --a2a-device: which backend runs the all-to-all stage. auto takes the CUDA backend only when every
// rank has a CUDA device, cuda fails the stage (naming the ranks) where some rank has none, and the
// report records the backend that ran.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "tests/check/check_process.h"

namespace ferry::testing {
namespace {

using nlohmann::json;

// Two ranks over shm, all-to-all only: the device choice is all these tests look at.
std::vector<std::string> alltoall_run(const std::string& json_path, const std::string& device) {
  std::vector<std::string> argv = small_check_run("shm", json_path);
  argv[2] = "2";  // --local-ranks
  argv.insert(argv.end(), {"--no-links", "--no-nccl", "--a2a-device", device});
  return argv;
}

TEST(CheckDevice, UnknownA2aDeviceIsRejectedNamingIt) {
  const ProcessResult r = run_process({ferry_check_binary(), "--a2a-device", "gpu"}, 20000);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--a2a-device: gpu not in {host,cuda,auto}"), std::string::npos) << r.output;
}

TEST(CheckDevice, AutoRunsOnTheHostWhereARankHasNoGpuAndTheReportSaysSo) {
  if (machine_has_cuda_device()) GTEST_SKIP() << "a CUDA device is here: auto picks cuda (test_check_cuda)";
  const std::string dir = make_temp_dir("auto");
  const ProcessResult r = run_process(alltoall_run(dir + "/report.json", "auto"), 55000);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("alltoall: host backend (--a2a-device auto: "), std::string::npos) << r.output;
  const json j = json::parse(read_text(dir + "/report.json"));
  EXPECT_EQ(j["summary"]["result"], "PASS");
  EXPECT_EQ(j["options"]["a2a_device"], "auto");
  ASSERT_EQ(j["alltoall"].size(), 6u);
  for (const json& a : j["alltoall"]) {
    EXPECT_TRUE(a["ok"].get<bool>()) << a.dump();
    EXPECT_EQ(a["device"], "host") << a.dump();
  }
  int checks = 0;
  for (const json& c : j["checks"]) {
    if (c["stage"] != "alltoall") continue;
    ++checks;
    EXPECT_EQ(c["verdict"], "PASS") << c.dump();
    EXPECT_EQ(c["metrics"]["device"], "host") << c.dump();
    EXPECT_EQ(c["metrics"]["device_requested"], "auto") << c.dump();
    const std::string why = c["metrics"]["device_choice"].get<std::string>();
#if defined(FERRY_CHECK_TEST_CUDA_BUILT)
    EXPECT_NE(why.find("no CUDA device on rank(s) 0, 1"), std::string::npos) << why;
#else
    EXPECT_NE(why.find("built without the CUDA backend on rank(s) 0, 1"), std::string::npos) << why;
#endif
  }
  EXPECT_EQ(checks, 6);
}

TEST(CheckDevice, CudaWhereNoRankHasAGpuFailsTheStageNamingTheRanks) {
  if (machine_has_cuda_device()) GTEST_SKIP() << "a CUDA device is here: --a2a-device cuda can run";
  const std::string dir = make_temp_dir("cuda");
  const ProcessResult r = run_process(alltoall_run(dir + "/report.json", "cuda"), 55000);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
#if defined(FERRY_CHECK_TEST_CUDA_BUILT)
  const std::string reason = "--a2a-device cuda: no CUDA device on rank(s) 0, 1 (host ";
#else
  const std::string reason = "--a2a-device cuda: built without the CUDA backend on rank(s) 0, 1 (host ";
#endif
  EXPECT_NE(r.output.find(reason), std::string::npos) << r.output;
  const json j = json::parse(read_text(dir + "/report.json"));
  EXPECT_EQ(j["summary"]["result"], "FAIL");
  EXPECT_TRUE(j["alltoall"].empty()) << "nothing ran on a backend the user did not ask for";
  int failed = 0;
  for (const json& c : j["checks"]) {
    if (c["stage"] != "alltoall") continue;
    EXPECT_EQ(c["verdict"], "FAIL") << c.dump();
    EXPECT_EQ(c["metrics"]["device"], "cuda") << c.dump();
    EXPECT_NE(c["reason"].get<std::string>().find(reason), std::string::npos) << c.dump();
    ++failed;
  }
  EXPECT_EQ(failed, 1);
}

TEST(CheckDevice, HostIsTakenWhenAsked) {
  const std::string dir = make_temp_dir("host");
  const ProcessResult r = run_process(alltoall_run(dir + "/report.json", "host"), 55000);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = json::parse(read_text(dir + "/report.json"));
  ASSERT_EQ(j["alltoall"].size(), 6u);
  for (const json& a : j["alltoall"]) EXPECT_EQ(a["device"], "host") << a.dump();
}

}  // namespace
}  // namespace ferry::testing
