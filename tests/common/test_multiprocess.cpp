// The fixture itself: what a test can rely on from run_ranks.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <thread>

#include "tests/common/multiprocess.h"

namespace ferry::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using Clock = std::chrono::steady_clock;

TEST(RunRanks, EachRankSeesTheLaunchEnvironmentAndItsOwnVariables) {
  LaunchOptions options;
  options.world_size = 3;
  options.env = {{"FI_PROVIDER", "tcp"}};
  options.rank_env = [](int rank) {
    return std::map<std::string, std::string>{{"FERRY_TEST_COLOR", rank == 1 ? "blue" : "red"}};
  };
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    auto var = [](const char* name) { return std::string(std::getenv(name) ?: "<unset>"); };
    EXPECT_EQ(var("RANK"), std::to_string(b.rank()));
    EXPECT_EQ(var("WORLD_SIZE"), "3");
    EXPECT_EQ(var("LOCAL_RANK"), std::to_string(b.rank()));
    EXPECT_EQ(var("LOCAL_WORLD_SIZE"), "3");
    EXPECT_EQ(var("MASTER_ADDR"), "127.0.0.1");
    EXPECT_EQ(var("FI_PROVIDER"), "tcp");
    EXPECT_EQ(var("FERRY_TEST_COLOR"), b.rank() == 1 ? "blue" : "red");
  }));
}

TEST(RunRanks, OutputIsCapturedPerRank) {
  LaunchOptions options;
  options.world_size = 2;
  auto results = run_ranks(options, [](te::Bootstrap& b) {
    std::printf("stdout of rank %d\n", b.rank());
    std::fprintf(stderr, "stderr of rank %d\n", b.rank());
  });
  expect_all_ok(results);
  ASSERT_EQ(results.size(), 2u);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(results[r].rank, r);
    EXPECT_THAT(results[r].output, HasSubstr("stdout of rank " + std::to_string(r)));
    EXPECT_THAT(results[r].output, HasSubstr("stderr of rank " + std::to_string(r)));
    EXPECT_THAT(results[r].output, Not(HasSubstr("of rank " + std::to_string(1 - r))));
  }
}

TEST(RunRanks, AnExceptionExitsOneWithTheRankAndMessage) {
  LaunchOptions options;
  options.world_size = 2;
  auto results = run_ranks(options, [](te::Bootstrap& b) {
    if (b.rank() == 1) throw std::runtime_error("the widget broke");
  });
  EXPECT_EQ(results[0].exit_code, 0);
  EXPECT_EQ(results[1].exit_code, 1);
  EXPECT_FALSE(results[1].signaled);
  EXPECT_THAT(results[1].output, HasSubstr("rank 1: the widget broke"));
}

TEST(RunRanks, AFailedExpectationFailsOnlyThatRank) {
  LaunchOptions options;
  options.world_size = 2;
  auto results =
      run_ranks(options, [](te::Bootstrap& b) { EXPECT_EQ(b.rank(), 0) << "only rank 0 passes"; });
  EXPECT_EQ(results[0].exit_code, 0) << results[0].output;
  EXPECT_EQ(results[1].exit_code, 1);
  EXPECT_THAT(results[1].output, HasSubstr("only rank 0 passes"));
}

TEST(RunRanks, AHungRankIsKilledAtTheDeadline) {
  LaunchOptions options;
  options.world_size = 2;
  options.timeout_ms = 3000;
  auto start = Clock::now();
  auto results = run_ranks(options, [](te::Bootstrap& b) {
    std::printf("rank %d started\n", b.rank());
    std::fflush(stdout);
    if (b.rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(120));
  });
  auto elapsed = Clock::now() - start;
  EXPECT_LT(elapsed, std::chrono::seconds(15));
  EXPECT_EQ(results[0].exit_code, 0);
  EXPECT_FALSE(results[0].timed_out);
  EXPECT_TRUE(results[1].timed_out);
  EXPECT_TRUE(results[1].signaled);
  EXPECT_THAT(results[1].output, HasSubstr("rank 1 started")) << "output before the kill is kept";
}

TEST(RunRanks, ARankThatCrashesIsReportedWithItsSignalAndItsLastLines) {
  LaunchOptions options;
  options.world_size = 2;
  auto results = run_ranks(options, [](te::Bootstrap& b) {
    std::printf("rank %d about to crash\n", b.rank());
    if (b.rank() == 1) {
      rlimit no_core{0, 0};  // no core file left in the build tree
      ::setrlimit(RLIMIT_CORE, &no_core);
      std::abort();
    }
  });
  EXPECT_EQ(results[0].exit_code, 0);
  EXPECT_TRUE(results[1].signaled);
  EXPECT_EQ(results[1].exit_code, SIGABRT);
  EXPECT_FALSE(results[1].timed_out);
  EXPECT_THAT(results[1].output, HasSubstr("rank 1 about to crash"));
}

pid_t g_parent_pid = 0;

TEST(RunRanks, ChildrenLeaveWithoutRunningTheParentsExitHandlers) {
  g_parent_pid = ::getpid();
  // Registered once per process; prints only when a child runs it.
  static const bool registered = [] {
    std::atexit([] {
      if (::getpid() != g_parent_pid) std::printf("EXIT HANDLER RAN IN A CHILD\n");
    });
    return true;
  }();
  (void)registered;
  LaunchOptions options;
  options.world_size = 2;
  auto results = run_ranks(options, [](te::Bootstrap&) {});
  expect_all_ok(results);
  for (const auto& r : results) EXPECT_THAT(r.output, Not(HasSubstr("EXIT HANDLER")));
}

TEST(RunRanks, FreePortsAreOutsideTheEphemeralRange) {
  int ephemeral_low = 0;
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    ASSERT_EQ(std::fscanf(f, "%d", &ephemeral_low), 1);
    std::fclose(f);
  }
  if (ephemeral_low <= 11000) GTEST_SKIP() << "ephemeral ports start at " << ephemeral_low;
  for (int i = 0; i < 20; ++i) {
    int port = pick_free_port();
    EXPECT_GE(port, 10000);
    EXPECT_LT(port, ephemeral_low);
  }
}

}  // namespace
}  // namespace ferry::testing
