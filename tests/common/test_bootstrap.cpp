// The bootstrap's contract: allgather and barrier among real processes, every wait bounded, and
// every failure naming the rank to blame.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <thread>
#include <vector>

#include "tests/common/multiprocess.h"
#include "transfer_engine/bootstrap.h"
#include "tests/common/error_of.h"
#include "transfer_engine/error.h"

namespace ferry::testing {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;
using Clock = std::chrono::steady_clock;

uint8_t pattern(int rank, size_t i) {
  return static_cast<uint8_t>(rank * 131 + i * 7 + (i >> 8));
}

std::vector<uint8_t> blob_of(int rank, size_t bytes) {
  std::vector<uint8_t> v(bytes);
  for (size_t i = 0; i < bytes; ++i) v[i] = pattern(rank, i);
  return v;
}

// Every rank's block of `all` is exactly what that rank contributed.
void expect_rank_major(const std::vector<uint8_t>& all, int world, size_t bytes) {
  ASSERT_EQ(all.size(), bytes * world);
  for (int r = 0; r < world; ++r) {
    for (size_t i = 0; i < bytes; ++i) {
      ASSERT_EQ(all[r * bytes + i], pattern(r, i)) << "block of rank " << r << ", byte " << i;
    }
  }
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

class AllgatherAmong : public ::testing::TestWithParam<int> {};

TEST_P(AllgatherAmong, EveryRankReceivesEveryBlobByteForByte) {
  const int world = GetParam();
  LaunchOptions options;
  options.world_size = world;
  auto results = run_ranks(options, [world](te::Bootstrap& b) {
    ASSERT_EQ(b.world_size(), world);
    EXPECT_EQ(b.local_size(), world);  // all on this host
    EXPECT_EQ(b.local_rank(), b.rank());
    // Small, odd-sized and larger-than-a-socket-buffer blobs, back to back.
    for (size_t bytes : {size_t{1}, size_t{4093}, size_t{3} << 20}) {
      std::vector<uint8_t> mine = blob_of(b.rank(), bytes);
      std::vector<uint8_t> all(bytes * world, 0xEE);
      b.allgather(mine.data(), bytes, all.data(), 30000);
      expect_rank_major(all, world, bytes);
    }
  });
  expect_all_ok(results);
}

INSTANTIATE_TEST_SUITE_P(Worlds, AllgatherAmong, ::testing::Values(2, 4, 8),
                         [](const auto& info) { return std::to_string(info.param) + "ranks"; });

// MASTER_ADDR as launchers write it: an IPv4 literal, a host name, an IPv6 literal.
class MasterAddress : public ::testing::TestWithParam<const char*> {};

TEST_P(MasterAddress, RanksMeetThroughIt) {
  const std::string addr = GetParam();
  if (addr == "::1") {
    int fd = ::socket(AF_INET6, SOCK_STREAM, 0);
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_loopback;
    bool ipv6 = fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    if (fd >= 0) ::close(fd);
    if (!ipv6) GTEST_SKIP() << "no IPv6 loopback on this machine";
  }
  LaunchOptions options;
  options.world_size = 3;
  options.env = {{"MASTER_ADDR", addr}};
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    uint16_t mine = static_cast<uint16_t>(100 + b.rank()), all[3];
    b.allgather(&mine, sizeof(mine), all, 10000);
    EXPECT_THAT(all, ::testing::ElementsAre(100, 101, 102));
  }));
}

INSTANTIATE_TEST_SUITE_P(Launchers, MasterAddress,
                         ::testing::Values("127.0.0.1", "localhost", "::1"), [](const auto& info) {
                           std::string name = info.param;
                           return name == "::1"         ? std::string("ipv6_loopback")
                                  : name == "localhost" ? std::string("host_name")
                                                        : std::string("ipv4");
                         });

TEST(Bootstrap, ZeroByteAllgatherAndSingleRankWorldComplete) {
  LaunchOptions options;
  options.world_size = 1;
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    EXPECT_EQ(b.rank(), 0);
    uint32_t mine = 0xC0FFEE, all = 0;
    b.allgather(&mine, sizeof(mine), &all, 1000);
    EXPECT_EQ(all, mine);
    b.barrier(1000);
  }));
  options.world_size = 3;
  expect_all_ok(
      run_ranks(options, [](te::Bootstrap& b) { b.allgather(nullptr, 0, nullptr, 10000); }));
}

TEST(Bootstrap, NoRankLeavesBarrierBeforeTheLastArrives) {
  LaunchOptions options;
  options.world_size = 4;
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    for (int round = 0; round < 3; ++round) {
      // Ranks arrive staggered, a different one last each round.
      int delay_ms = 150 * ((b.rank() + round) % b.world_size());
      std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
      int64_t arrived_ns = now_ns();
      b.barrier(30000);
      int64_t left_ns = now_ns();
      std::vector<int64_t> arrivals(b.world_size());
      b.allgather(&arrived_ns, sizeof(arrived_ns), arrivals.data(), 30000);
      for (int r = 0; r < b.world_size(); ++r) {
        EXPECT_GE(left_ns, arrivals[r])
            << "left barrier " << round << " before rank " << r << " arrived";
      }
    }
  }));
}

TEST(Bootstrap, LocalRanksAreDerivedFromHostNamesWhenNotGiven) {
  LaunchOptions options;
  options.world_size = 3;
  options.env = {{"LOCAL_RANK", ""}, {"LOCAL_WORLD_SIZE", ""}};  // empty counts as unset
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    EXPECT_EQ(b.local_size(), 3);
    EXPECT_EQ(b.local_rank(), b.rank());
  }));
}

TEST(Bootstrap, LocalRanksFromTheLauncherWin) {
  // Two "hosts" of two ranks each, as a launcher would say.
  LaunchOptions options;
  options.world_size = 4;
  options.rank_env = [](int rank) {
    return std::map<std::string, std::string>{{"LOCAL_RANK", std::to_string(rank % 2)},
                                              {"LOCAL_WORLD_SIZE", "2"}};
  };
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    EXPECT_EQ(b.local_rank(), b.rank() % 2);
    EXPECT_EQ(b.local_size(), 2);
  }));
}

TEST(Bootstrap, ARootThatStartsLateIsWaitedFor) {
  LaunchOptions options;
  options.world_size = 3;
  options.before_bootstrap = [](int rank) {
    if (rank == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  };
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) { b.barrier(10000); }));
}

// Whether rank 0's clock starts first or last: when it starts last, the waiting ranks' deadlines
// pass first and they ask rank 0 who is missing; either way every rank names the same culprit.
class SetupDeadline : public ::testing::TestWithParam<bool> {};

TEST_P(SetupDeadline, ARankThatNeverJoinsIsNamedByEveryRank) {
  const bool root_starts_last = GetParam();
  LaunchOptions options;
  options.world_size = 3;
  options.bootstrap_timeout_ms = 3000;
  options.before_bootstrap = [root_starts_last](int rank) {
    if (rank == 2) _exit(0);  // started, but never reaches the bootstrap
    if (rank == 0 && root_starts_last) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  };
  auto start = Clock::now();
  auto results = run_ranks(options, [](te::Bootstrap&) {});
  auto elapsed_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
  for (int r : {0, 1}) {
    EXPECT_EQ(results[r].exit_code, 1) << results[r].output;
    EXPECT_FALSE(results[r].timed_out);
    EXPECT_THAT(results[r].output,
                AllOf(HasSubstr("rank 2 did not connect"), HasSubstr("[timeout]")));
  }
  if (root_starts_last) {
    EXPECT_THAT(results[1].output, HasSubstr("rank 1 gave up waiting"));
  }
  EXPECT_LT(elapsed_ms, 3000 + 1500 + 6000) << "the setup deadline was not kept";
}

INSTANTIATE_TEST_SUITE_P(RootClock, SetupDeadline, ::testing::Bool(), [](const auto& info) {
  return info.param ? std::string("RootStartsLast") : std::string("RootStartsFirst");
});

TEST(Bootstrap, AMissingRootIsNamedBySetupTimeout) {
  LaunchOptions options;
  options.world_size = 3;
  options.bootstrap_timeout_ms = 2000;
  options.before_bootstrap = [](int rank) {
    if (rank == 0) _exit(0);
  };
  auto results = run_ranks(options, [](te::Bootstrap&) {});
  for (int r : {1, 2}) {
    EXPECT_EQ(results[r].exit_code, 1) << results[r].output;
    EXPECT_THAT(results[r].output,
                AllOf(HasSubstr("could not reach rank 0"), HasSubstr("[timeout]")));
  }
}

class AllgatherDeadline : public ::testing::TestWithParam<bool> {};

TEST_P(AllgatherDeadline, ARankLateForAnAllgatherIsNamedByEveryWaitingRank) {
  const bool root_starts_last = GetParam();
  LaunchOptions options;
  options.world_size = 4;
  expect_all_ok(run_ranks(options, [root_starts_last](te::Bootstrap& b) {
    constexpr int kTimeoutMs = 2000;
    if (b.rank() == 3) {
      // Late past everybody's deadline (and the root's answer to their queries).
      std::this_thread::sleep_for(std::chrono::milliseconds(kTimeoutMs + 2500));
      return;
    }
    // Skewed clocks: the waiting ranks start their deadlines at different times.
    int order = root_starts_last ? 2 - b.rank() : b.rank();
    std::this_thread::sleep_for(std::chrono::milliseconds(300 * order));
    uint64_t mine = b.rank(), all[4];
    auto start = Clock::now();
    auto error = error_of([&] { b.allgather(&mine, sizeof(mine), all, kTimeoutMs); });
    auto elapsed_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
    ASSERT_TRUE(error.has_value());
    EXPECT_EQ(error->status(), Status::timeout) << error->what();
    EXPECT_THAT(error->what(), HasSubstr("rank 3 did not arrive"));
    if (root_starts_last) {
      EXPECT_THAT(error->what(), HasSubstr("rank 2 gave up waiting"));
    }
    EXPECT_LE(elapsed_ms, kTimeoutMs + 2500);
    // A bootstrap that failed stays failed rather than silently pairing up the wrong operations.
    auto again = error_of([&] { b.barrier(1000); });
    ASSERT_TRUE(again.has_value());
    EXPECT_THAT(again->what(), HasSubstr("earlier failure"));
  }));
}

INSTANTIATE_TEST_SUITE_P(RootClock, AllgatherDeadline, ::testing::Bool(), [](const auto& info) {
  return info.param ? std::string("RootStartsLast") : std::string("RootStartsFirst");
});

TEST(Bootstrap, ARankThatExitsAfterJoiningIsReportedAsFailedPeer) {
  LaunchOptions options;
  options.world_size = 3;
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    if (b.rank() == 2) return;  // joined, then leaves: its connection closes
    auto start = Clock::now();
    auto error = error_of([&] { b.barrier(20000); });
    auto elapsed_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - start).count();
    ASSERT_TRUE(error.has_value());
    EXPECT_EQ(error->status(), Status::peer_failed) << error->what();
    EXPECT_THAT(error->what(), HasSubstr("rank 2 disconnected"));
    EXPECT_LT(elapsed_ms, 5000) << "a departure must be seen at once, not at the deadline";
  }));
}

TEST(Bootstrap, ARootThatExitsAfterJoiningIsReportedAsFailedPeer) {
  LaunchOptions options;
  options.world_size = 3;
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    if (b.rank() == 0) return;
    auto error = error_of([&] { b.barrier(20000); });
    ASSERT_TRUE(error.has_value());
    EXPECT_EQ(error->status(), Status::peer_failed) << error->what();
    EXPECT_THAT(error->what(), HasSubstr("rank 0 (bootstrap root"));
  }));
}

TEST(Bootstrap, MismatchedAllgatherSizesAreRejectedEverywhere) {
  LaunchOptions options;
  options.world_size = 3;
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    std::vector<uint8_t> mine(b.rank() == 1 ? 16 : 8), all(16 * 3);
    auto error = error_of([&] { b.allgather(mine.data(), mine.size(), all.data(), 10000); });
    ASSERT_TRUE(error.has_value());
    EXPECT_EQ(error->status(), Status::invalid_argument) << error->what();
    EXPECT_THAT(error->what(), HasSubstr("rank 1 contributed 16 bytes"));
  }));
}

TEST(Bootstrap, RanksLaunchedWithDifferentWorldSizesAreRejected) {
  LaunchOptions options;
  options.world_size = 2;
  options.bootstrap_timeout_ms = 10000;
  options.rank_env = [](int rank) {
    return rank == 1 ? std::map<std::string, std::string>{{"WORLD_SIZE", "3"}}
                     : std::map<std::string, std::string>{};
  };
  auto results = run_ranks(options, [](te::Bootstrap&) {});
  for (const RankResult& r : results) {
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_THAT(r.output, AllOf(HasSubstr("rank 1 was started with world_size 3, rank 0 with 2"),
                                HasSubstr("[invalid argument]")));
  }
}

TEST(Bootstrap, TwoProcessesClaimingOneRankAreRejected) {
  LaunchOptions options;
  options.world_size = 3;
  options.bootstrap_timeout_ms = 10000;
  options.rank_env = [](int rank) {
    return rank == 2 ? std::map<std::string, std::string>{{"RANK", "1"}}
                     : std::map<std::string, std::string>{};
  };
  auto results = run_ranks(options, [](te::Bootstrap&) {});
  for (const RankResult& r : results) {
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_THAT(r.output, HasSubstr("two processes claim rank 1"));
  }
}

TEST(Bootstrap, TcpConfigIsValidated) {
  te::TcpBootstrapConfig config;
  config.rank = 2;
  config.world_size = 2;
  auto error = error_of([&] { te::make_tcp_bootstrap(config); });
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->status(), Status::invalid_argument);
  config.rank = 0;
  config.master_port = 70000;
  error = error_of([&] { te::make_tcp_bootstrap(config); });
  ASSERT_TRUE(error.has_value());
  EXPECT_THAT(error->what(), HasSubstr("master_port 70000"));
}

// ---- callback bootstrap ------------------------------------------------------------------------

int allgather_through(void* context, const void* in, size_t bytes, void* out) {
  try {
    static_cast<te::Bootstrap*>(context)->allgather(in, bytes, out, 30000);
    return 0;
  } catch (const Error&) {
    return 5;
  }
}

TEST(CallbackBootstrap, AllgathersThroughTheCallersProcessGroup) {
  LaunchOptions options;
  options.world_size = 4;
  expect_all_ok(run_ranks(options, [](te::Bootstrap& group) {
    // A serving stack's own process group, seen through the C callback seam.
    te::BootstrapCallbacks callbacks;
    callbacks.context = &group;
    callbacks.allgather = allgather_through;
    callbacks.rank = group.rank();
    callbacks.world_size = group.world_size();
    auto b = te::make_callback_bootstrap(callbacks);
    EXPECT_EQ(b->local_size(), 4);  // derived from host names through the callback
    EXPECT_EQ(b->local_rank(), group.rank());
    std::vector<uint8_t> mine = blob_of(b->rank(), 777), all(777 * 4);
    b->allgather(mine.data(), mine.size(), all.data(), 30000);
    expect_rank_major(all, 4, 777);
    b->barrier(30000);
  }));
}

TEST(CallbackBootstrap, ACallbackFailureIsATransportError) {
  te::BootstrapCallbacks callbacks;
  callbacks.allgather = [](void*, const void*, size_t, void*) { return 42; };
  callbacks.local_rank = 0;
  callbacks.local_size = 1;
  auto b = te::make_callback_bootstrap(callbacks);
  auto error = error_of([&] { b->barrier(1000); });
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->status(), Status::transport);
  EXPECT_THAT(error->what(), HasSubstr("returned 42"));
}

TEST(CallbackBootstrap, InvalidCallbacksAreRejected) {
  te::BootstrapCallbacks callbacks;  // no allgather
  auto error = error_of([&] { te::make_callback_bootstrap(callbacks); });
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->status(), Status::invalid_argument);
  callbacks.allgather = allgather_through;
  callbacks.rank = 3;
  callbacks.world_size = 2;
  error = error_of([&] { te::make_callback_bootstrap(callbacks); });
  ASSERT_TRUE(error.has_value());
  EXPECT_THAT(error->what(), HasSubstr("rank 3 is outside world_size 2"));
}

// ---- bootstrap_from_env ------------------------------------------------------------------------

// Sets (or, with nullptr, clears) variables for one test and restores them afterwards.
class ScopedEnv {
 public:
  ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (auto [name, value] : vars) {
      const char* old = std::getenv(name);
      saved_.push_back({name, old ? std::optional<std::string>(old) : std::nullopt});
      if (value) {
        ::setenv(name, value, 1);
      } else {
        ::unsetenv(name);
      }
    }
  }
  ~ScopedEnv() {
    for (auto& [name, value] : saved_) {
      if (value) {
        ::setenv(name.c_str(), value->c_str(), 1);
      } else {
        ::unsetenv(name.c_str());
      }
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

TEST(BootstrapFromEnv, WithoutALauncherTheLaunchersItKnowsAreListed) {
  ScopedEnv env{{"MASTER_ADDR", nullptr},          {"MASTER_PORT", nullptr}, {"RANK", nullptr},
                {"WORLD_SIZE", nullptr},           {"OMPI_COMM_WORLD_RANK", nullptr},
                {"PMI_RANK", nullptr},             {"PMIX_RANK", nullptr},
                {"SLURM_PROCID", nullptr},         {"SLURM_NTASKS", nullptr}};
  auto error = error_of([] { te::bootstrap_from_env(1000); });
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->status(), Status::invalid_argument);
  EXPECT_THAT(error->what(), AllOf(HasSubstr("no launcher found"), HasSubstr("MASTER_ADDR"),
                                   HasSubstr("OMPI_COMM_WORLD_RANK"), HasSubstr("SLURM_PROCID")));
  ScopedEnv rank_only{{"RANK", "0"}};
  error = error_of([] { te::bootstrap_from_env(1000); });
  ASSERT_TRUE(error.has_value());
  EXPECT_THAT(error->what(), HasSubstr("RANK is set but WORLD_SIZE is not"));
  ScopedEnv no_rendezvous{{"WORLD_SIZE", "2"}};
  error = error_of([] { te::bootstrap_from_env(1000); });
  ASSERT_TRUE(error.has_value());
  EXPECT_THAT(error->what(), AllOf(HasSubstr("no rendezvous"), HasSubstr("MASTER_ADDR, MASTER_PORT")));
}

TEST(BootstrapFromEnv, MalformedNumbersAreNamed) {
  ScopedEnv env{
      {"MASTER_ADDR", "127.0.0.1"}, {"MASTER_PORT", "29x"}, {"RANK", "0"}, {"WORLD_SIZE", "2"}};
  auto error = error_of([] { te::bootstrap_from_env(1000); });
  ASSERT_TRUE(error.has_value());
  EXPECT_EQ(error->status(), Status::invalid_argument);
  EXPECT_THAT(error->what(), HasSubstr("MASTER_PORT='29x'"));
  ScopedEnv rank_env{{"MASTER_PORT", "29500"}, {"RANK", "2"}};
  error = error_of([] { te::bootstrap_from_env(1000); });
  ASSERT_TRUE(error.has_value());
  EXPECT_THAT(error->what(), HasSubstr("RANK='2'"));
}

// srun without MPI: ranks from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the rendezvous on the
// step's first node at the port every rank derives from the job id.
TEST(BootstrapFromEnv, SlurmLaunchesMeetWithoutTorchrunVariables) {
  int port = 0;
  do port = pick_free_port(); while (port < 20000 || port >= 40000);
  int job = 1;
  while (20000 + (job * 31) % 20000 != port) ++job;
  LaunchOptions options;
  options.world_size = 3;
  options.rank_env = [job](int rank) {
    return std::map<std::string, std::string>{
        {"RANK", ""}, {"WORLD_SIZE", ""}, {"LOCAL_RANK", ""}, {"LOCAL_WORLD_SIZE", ""},
        {"MASTER_ADDR", ""}, {"MASTER_PORT", ""}, {"SLURM_PROCID", std::to_string(rank)},
        {"SLURM_NTASKS", "3"}, {"SLURM_LOCALID", std::to_string(rank)},
        {"SLURM_TASKS_PER_NODE", "3"}, {"SLURM_JOB_ID", std::to_string(job)},
        {"SLURM_STEP_ID", "0"}, {"SLURM_STEP_NODELIST", "localhost"}};
  };
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    EXPECT_EQ(b.world_size(), 3);
    EXPECT_EQ(b.local_size(), 3);
    EXPECT_EQ(b.local_rank(), b.rank());
    int mine = 100 + b.rank(), all[3];
    b.allgather(&mine, sizeof(mine), all, 10000);
    EXPECT_THAT(all, ::testing::ElementsAre(100, 101, 102));
  }));
}

// Under torchrun the store (the agent's, or init_process_group's on rank 0) already listens on
// MASTER_PORT; the ranks still meet, on the next port.
TEST(BootstrapFromEnv, UnderTorchrunTheStoreKeepsMasterPortAndTheRanksMeetBesideIt) {
  const int port = pick_free_port();
  const int store = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = htons(static_cast<uint16_t>(port));
  ASSERT_EQ(::bind(store, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0) << std::strerror(errno);
  ASSERT_EQ(::listen(store, 16), 0);
  LaunchOptions options;
  options.world_size = 3;
  options.env = {{"MASTER_PORT", std::to_string(port)}, {"TORCHELASTIC_RUN_ID", "run-1"}};
  expect_all_ok(run_ranks(options, [](te::Bootstrap& b) {
    int mine = 100 + b.rank(), all[3];
    b.allgather(&mine, sizeof(mine), all, 10000);
    EXPECT_THAT(all, ::testing::ElementsAre(100, 101, 102));
  }));
  ::close(store);
}

TEST(BootstrapFromEnv, SingleRankTorchrunEnvironmentWorks) {
  std::string port = std::to_string(pick_free_port());
  ScopedEnv env{
      {"MASTER_ADDR", "localhost"}, {"MASTER_PORT", port.c_str()}, {"RANK", "0"},
      {"WORLD_SIZE", "1"},          {"LOCAL_RANK", "0"},           {"LOCAL_WORLD_SIZE", "1"}};
  auto b = te::bootstrap_from_env(2000);
  EXPECT_EQ(b->rank(), 0);
  EXPECT_EQ(b->world_size(), 1);
  EXPECT_EQ(b->local_size(), 1);
  b->barrier(1000);
}

}  // namespace
}  // namespace ferry::testing
