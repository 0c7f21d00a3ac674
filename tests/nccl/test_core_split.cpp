// The arithmetic of csrc/nccl (label ep): which ranks form the TP and PP groups, how a rank's cores
// are split between Ferry's threads and NCCL's, and, on this machine's real threads, that a thread
// started under a core set (an engine worker among them) stays on it, which is how the split is
// applied.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "csrc/nccl/cores.h"
#include "csrc/nccl/groups.h"
#include "ferry/ferry.h"
#include "tests/common/multiprocess.h"
#include "tools/common/bootstrap.h"
#include "transfer_engine/error.h"

namespace ferry::nccl {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Cores = std::vector<std::vector<int>>;

// ---- groups ----------------------------------------------------------------------------------

TEST(NcclGroups, TpGroupsAreConsecutiveRanksAndPpGroupsStrideByStage) {
  const ParallelLayout layout{16, 4, 2};  // 2 stages of 8 ranks, TP 4
  const Group tp = tp_group(layout, 5);
  EXPECT_THAT(tp.ranks, ElementsAre(4, 5, 6, 7));
  EXPECT_EQ(tp.index, 1);
  EXPECT_EQ(tp.id, 1);
  const Group pp = pp_group(layout, 13);
  EXPECT_THAT(pp.ranks, ElementsAre(5, 13));
  EXPECT_EQ(pp.index, 1);
  EXPECT_EQ(pp.leader(), 5);
}

TEST(NcclGroups, EveryRankIsInExactlyOneGroupOfEachKind) {
  const ParallelLayout layout{24, 2, 3};
  std::vector<int> tp_seen(24, 0), pp_seen(24, 0);
  for (int r = 0; r < 24; ++r) {
    const Group tp = tp_group(layout, r), pp = pp_group(layout, r);
    EXPECT_EQ(tp.ranks[size_t(tp.index)], r);
    EXPECT_EQ(pp.ranks[size_t(pp.index)], r);
    if (tp.leader() == r)
      for (int m : tp.ranks) ++tp_seen[size_t(m)];
    if (pp.leader() == r)
      for (int m : pp.ranks) ++pp_seen[size_t(m)];
  }
  EXPECT_EQ(tp_seen, std::vector<int>(24, 1));
  EXPECT_EQ(pp_seen, std::vector<int>(24, 1));
}

TEST(NcclGroups, ALayoutThatDoesNotFitTheWorldIsNamed) {
  EXPECT_THAT(check_layout({8, 3, 1}), HasSubstr("tp_size * pp_size = 3 must divide the world size 8"));
  EXPECT_THAT(check_layout({8, 0, 1}), HasSubstr("tp_size must be at least 1"));
  EXPECT_EQ(check_layout({8, 2, 2}), "");
}

// ---- the split ---------------------------------------------------------------------------------

Cores single_cpu_cores(int first, int count) {
  Cores c;
  for (int i = 0; i < count; ++i) c.push_back({first + i});
  return c;
}

TEST(CoreSplit, FerryTakesTheFirstCoresOfItsSliceAndNcclTheRest) {
  const CoreSplit s = split_cores(single_cpu_cores(0, 16), 1, 4, 2);
  EXPECT_THAT(s.slice, ElementsAre(4, 5, 6, 7));
  EXPECT_THAT(s.ferry, ElementsAre(4, 5));
  EXPECT_THAT(s.nccl, ElementsAre(6, 7));
  EXPECT_TRUE(s.disjoint());
  EXPECT_EQ(s.note, "");
}

TEST(CoreSplit, HyperthreadSiblingsStayOnOneSide) {
  // A socket of 4 cores with two hardware threads each (CPU c and c + 8).
  const Cores socket = {{0, 8}, {1, 9}, {2, 10}, {3, 11}};
  const CoreSplit s = split_cores(socket, 0, 2, 1);
  EXPECT_THAT(s.ferry, ElementsAre(0, 8));
  EXPECT_THAT(s.nccl, ElementsAre(1, 9));
}

TEST(CoreSplit, AnUnevenPoolGivesTheFirstSlicesOneCoreMore) {
  std::vector<size_t> sizes;
  for (int i = 0; i < 4; ++i) sizes.push_back(split_cores(single_cpu_cores(0, 10), i, 4, 1).slice.size());
  EXPECT_THAT(sizes, ElementsAre(3, 3, 2, 2));
}

TEST(CoreSplit, NcclKeepsAtLeastOneCore) {
  const CoreSplit s = split_cores(single_cpu_cores(0, 2), 0, 1, 3);
  EXPECT_THAT(s.ferry, ElementsAre(0));
  EXPECT_THAT(s.nccl, ElementsAre(1));
  EXPECT_THAT(s.note, HasSubstr("Ferry asked for 3 cores and got 1"));
}

TEST(CoreSplit, FewerCoresThanRanksShareCoresAndSaySo) {
  const CoreSplit s = split_cores(single_cpu_cores(0, 2), 3, 4, 1);
  EXPECT_THAT(s.slice, ElementsAre(1));
  EXPECT_EQ(s.ferry, s.nccl);
  EXPECT_FALSE(s.disjoint());
  EXPECT_THAT(s.note, HasSubstr("4 ranks share 2 core(s)"));
}

TEST(CoreSplit, AShareOutsideTheRanksIsRejected) {
  EXPECT_THROW(split_cores(single_cpu_cores(0, 4), 4, 4, 1), Error);
  EXPECT_THROW(split_cores({}, 0, 1, 1), Error);
}

std::string read_data(const std::string& name) {
  std::ifstream in(std::string(FERRY_TEST_DATA_DIR) + "/" + name);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(CoreSplit, ThePoolIsTheGpusSocketWithinTheAllowedCpus) {
  const te::Topology topo = te::Topology::from_xml(read_data("p5_like_2socket.xml"));
  std::vector<int> all(16);
  for (int c = 0; c < 16; ++c) all[size_t(c)] = c;
  EXPECT_THAT(core_pool(topo, 1, "", all), ElementsAre(4, 5, 6, 7, 12, 13, 14, 15));
  // A taskset that leaves two of socket 1's CPUs: those.
  EXPECT_THAT(core_pool(topo, 1, "", {0, 1, 5, 13}), ElementsAre(5, 13));
  // No GPU: the NIC's socket; neither: whatever is allowed.
  EXPECT_THAT(core_pool(topo, -1, "rdmap19s0", all), ElementsAre(0, 1, 2, 3, 8, 9, 10, 11));
  EXPECT_THAT(core_pool(topo, -1, "", {2, 3}), ElementsAre(2, 3));
}

TEST(CoreSplit, CollisionsAreFerryCoresOfOneRankThatOthersOfItsNodeMayUse) {
  const std::vector<RankCores> ranks = {
      {0, "a", {0}, {1, 2}},
      {1, "a", {2}, {3}},  // Ferry on 2, where rank 0's NCCL may run
      {2, "b", {1}, {0}},  // another node: its CPU numbers are its own
  };
  const std::vector<std::string> lines = core_collisions(ranks, "NCCL");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_THAT(lines[0], HasSubstr("a: Ferry's threads of rank 1 (CPUs 2) and NCCL's of rank 0 (CPUs 1-2) share CPU 2"));
  EXPECT_TRUE(core_collisions({{0, "a", {0}, {1}}, {1, "a", {2}, {3}}}, "NCCL").empty());
  // A rank with itself: everything on every core collides.
  EXPECT_EQ(core_collisions({{0, "a", {0, 1}, {0, 1}}}, "the GEMM").size(), 1u);
}

TEST(CoreSplit, RanksOfANodeWithTheSamePoolShareItInRankOrder) {
  testing::LaunchOptions launch;
  launch.world_size = 4;
  auto results = testing::run_ranks(launch, [](te::Bootstrap& boot) {
    // Two "nodes" of two ranks each, every rank drawing from CPUs 0-7.
    const std::string node = "node" + std::to_string(boot.rank() % 2);
    const CoreSplit s = plan_core_split(boot, node, {0, 1, 2, 3, 4, 5, 6, 7}, 1, 10000);
    EXPECT_EQ(s.share_count, 2);
    EXPECT_EQ(s.share_index, boot.rank() / 2);
    EXPECT_EQ(s.slice.size(), 4u);
    // What every rank gathers of the others' cores: node and CPU sets, in rank order.
    const auto all = gather_rank_cores(boot, {boot.rank(), node, s.ferry, s.nccl}, 10000);
    ASSERT_EQ(all.size(), 4u);
    EXPECT_EQ(all[3].node, "node1");
    EXPECT_EQ(all[size_t(boot.rank())].ferry, s.ferry);
    EXPECT_EQ(all[size_t(boot.rank())].other, s.nccl);
  });
  testing::expect_all_ok(results);
}

// ---- applying it: threads inherit the mask they were started under ----------------------------

TEST(CoreSplit, AThreadStartedUnderScopedAffinityStaysOnItsCoresAndTheCallerGetsItsMaskBack) {
  const std::vector<int> mask = thread_cpus();
  const std::vector<int> one = {allowed_cpus().back()};
  const auto before = process_threads();
  bool stop = false;
  std::mutex m;
  std::condition_variable cv;
  std::thread t;
  {
    ScopedAffinity scope(one);
    EXPECT_EQ(thread_cpus(), one);
    t = std::thread([&] {
      std::unique_lock lock(m);
      cv.wait(lock, [&] { return stop; });
    });
  }
  EXPECT_EQ(thread_cpus(), mask);
  const auto started = new_threads(before, process_threads());
  ASSERT_EQ(started.size(), 1u);
  EXPECT_EQ(started[0].cpus, one);
  {
    std::lock_guard lock(m);
    stop = true;
  }
  cv.notify_one();
  t.join();
}

TEST(CoreSplit, TheTransferEnginesWorkerStartedUnderFerrysCoresStaysOnThem) {
  testing::LaunchOptions launch;
  launch.world_size = 2;
  auto results = testing::run_ranks(launch, [](te::Bootstrap& boot) {
    const std::vector<int> ferry = {allowed_cpus().front()};
    tools::CBootstrap cboot(boot);
    ferry_a2a_config_t c;
    ferry_a2a_config_init(&c);
    c.rank = boot.rank();
    c.world_size = boot.world_size();
    c.num_experts = 2;
    c.hidden_dim = 64;
    c.max_tokens_per_rank = 4;
    c.provider = "tcp";
    const auto before = process_threads();
    ferry_a2a_t a2a = nullptr;
    {
      ScopedAffinity scope(ferry);
      ASSERT_EQ(ferry_a2a_create(&c, cboot.get(), &a2a), FERRY_OK) << ferry_last_error();
    }
    const auto started = new_threads(before, process_threads());
    EXPECT_FALSE(started.empty());
    for (const auto& t : started) EXPECT_EQ(t.cpus, ferry) << "thread " << t.name;
    ferry_a2a_destroy(a2a);
  });
  testing::expect_all_ok(results);
}

}  // namespace
}  // namespace ferry::nccl
