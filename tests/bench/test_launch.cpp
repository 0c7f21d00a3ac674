// The shared launcher of ferry-bench and ferry-check: environment discovery, --local-ranks
// self-spawning with forwarded output, failure and deadline handling, and the report helpers.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <csignal>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "tests/common/shell.h"
#include "tools/common/env.h"
#include "tools/common/launch.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

using namespace ferry::tools;

namespace {

using RunResult = ferry::testing::ShellResult;

RunResult run(const std::string& args) { return ferry::testing::run_shell(std::string(LAUNCH_PROBE) + " " + args); }
// `env`: "NAME=value ..." for the probe (and, through it, its ranks).
RunResult run_with_env(const std::string& env, const std::string& args) {
  return ferry::testing::run_shell("env " + env + " " + LAUNCH_PROBE + " " + args);
}

}  // namespace

TEST(RankEnv, OpenMpiVariablesGiveRankWorldAndLocalRank) {
  const auto env = discover_rank_env({{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "16"},
                                      {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                      {"OMPI_COMM_WORLD_LOCAL_SIZE", "8"}});
  EXPECT_EQ(env.rank, 5);
  EXPECT_EQ(env.world_size, 16);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_EQ(env.local_size, 8);
  EXPECT_TRUE(env.under_mpi());
}

TEST(RankEnv, PmiAndPmixVariables) {
  auto pmi = discover_rank_env({{"PMI_RANK", "3"}, {"PMI_SIZE", "4"}});
  EXPECT_EQ(pmi.rank, 3);
  EXPECT_EQ(pmi.world_size, 4);
  EXPECT_TRUE(pmi.under_mpi());
  auto pmix = discover_rank_env({{"PMIX_RANK", "2"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "2"}});
  EXPECT_EQ(pmix.rank, 2);
  EXPECT_EQ(pmix.world_size, 8);
  EXPECT_EQ(pmix.local_rank, 2);
}

TEST(RankEnv, SlurmWithoutMpi) {
  const auto env = discover_rank_env({{"SLURM_PROCID", "9"}, {"SLURM_NTASKS", "16"},
                                      {"SLURM_LOCALID", "1"}, {"SLURM_TASKS_PER_NODE", "8(x2)"}});
  EXPECT_EQ(env.launcher, Launcher::slurm);
  EXPECT_EQ(env.rank, 9);
  EXPECT_EQ(env.world_size, 16);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_EQ(env.local_size, 8);
  EXPECT_FALSE(env.under_mpi());
}

TEST(RankEnv, SlurmWithoutRendezvousUsesTheFirstNodeAndAJobPort) {
  const std::map<std::string, std::string> vars{{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "16"},
                                                {"SLURM_LOCALID", "3"}, {"SLURM_JOB_ID", "4242"},
                                                {"SLURM_STEP_NODELIST", "gpu[07-08,11],cpu1"}};
  const auto a = discover_rank_env(vars);
  EXPECT_EQ(a.master_addr, "gpu07");
  EXPECT_GE(a.master_port, 20000);
  EXPECT_LT(a.master_port, 40000);
  // Every rank of the step derives the same rendezvous.
  auto other = vars;
  other["SLURM_PROCID"] = "12";
  EXPECT_EQ(discover_rank_env(other).master_port, a.master_port);
  EXPECT_EQ(first_slurm_host("node1,node2"), "node1");
  EXPECT_EQ(first_slurm_host("single"), "single");
}

TEST(RankEnv, TorchrunVariablesIncludingRendezvous) {
  const auto env = discover_rank_env({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"},
                                      {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29500"}});
  EXPECT_EQ(env.launcher, Launcher::torchrun);
  EXPECT_EQ(env.rank, 1);
  EXPECT_EQ(env.world_size, 2);
  EXPECT_TRUE(env.has_master());
  EXPECT_EQ(env.master_addr, "10.0.0.1");
  EXPECT_EQ(env.master_port, 29500);
}

TEST(RankEnv, NoLauncherIsOneProcess) {
  const auto env = discover_rank_env(std::map<std::string, std::string>{});
  EXPECT_EQ(env.launcher, Launcher::none);
  EXPECT_EQ(env.rank, 0);
  EXPECT_EQ(env.world_size, 1);
}

TEST(RankEnv, MalformedOrInconsistentValuesNameTheVariable) {
  try {
    discover_rank_env({{"RANK", "x1"}, {"WORLD_SIZE", "2"}});
    FAIL() << "a malformed RANK was accepted";
  } catch (const ferry::Error& e) {
    EXPECT_NE(std::string(e.what()).find("RANK"), std::string::npos) << e.what();
  }
  try {
    discover_rank_env({{"RANK", "4"}, {"WORLD_SIZE", "4"}});
    FAIL() << "rank == world size was accepted";
  } catch (const ferry::Error& e) {
    EXPECT_NE(std::string(e.what()).find("outside [0, 4)"), std::string::npos) << e.what();
  }
  EXPECT_THROW(discover_rank_env({{"RANK", "0"}}), ferry::Error);
}

// The tools read the launcher through transfer_engine's reader, the one ferry_bootstrap_from_env
// uses: both see the same rank, world, locality, rendezvous and job id for every launcher.
TEST(RankEnv, TheToolsAndTheLibraryReadTheLauncherAlike) {
  const std::vector<std::map<std::string, std::string>> launches = {
      {{"OMPI_COMM_WORLD_RANK", "5"}, {"OMPI_COMM_WORLD_SIZE", "16"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
       {"OMPI_COMM_WORLD_LOCAL_SIZE", "8"}, {"OMPI_MCA_ess_base_jobid", "12345"}},
      {{"PMIX_RANK", "2"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "2"}, {"PMIX_NAMESPACE", "job.7"}},
      {{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "3"}, {"SLURM_JOB_ID", "4242"},
       {"SLURM_STEP_ID", "1"}, {"SLURM_STEP_NODELIST", "gpu[07-08]"}, {"SLURM_TASKS_PER_NODE", "8(x2)"}},
      {{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "10.0.0.1"},
       {"MASTER_PORT", "29500"}, {"TORCHELASTIC_RUN_ID", "run-9"}},
  };
  for (const auto& vars : launches) {
    const RankEnv tools = discover_rank_env(vars);
    const ferry::te::LaunchEnv library = ferry::te::read_launch_env(vars);
    EXPECT_EQ(tools.launcher, library.launcher);
    EXPECT_EQ(tools.rank, library.rank);
    EXPECT_EQ(tools.world_size, library.world_size);
    EXPECT_EQ(tools.local_rank, library.local_rank);
    EXPECT_EQ(tools.local_size, library.local_size);
    EXPECT_EQ(tools.master_addr, library.master_addr);
    EXPECT_EQ(tools.master_port, library.master_port);
    EXPECT_FALSE(tools.job_id.empty()) << "every launcher above names its job";
    EXPECT_EQ(tools.job_id, library.job_id);
  }
}

// What the library refuses the tools refuse too: a local rank beyond the local size given, a world
// beyond 2^24 ranks (the tools' own reader took it), and an empty RANK (unset, as launchers mean it).
TEST(RankEnv, ValuesTheLibraryRefusesAreRefused) {
  EXPECT_THROW(discover_rank_env({{"RANK", "1"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "3"},
                                  {"LOCAL_WORLD_SIZE", "2"}}),
               ferry::Error);
  EXPECT_THROW(discover_rank_env({{"RANK", "0"}, {"WORLD_SIZE", "33554432"}}), ferry::Error);
  EXPECT_THROW(discover_rank_env({{"RANK", ""}, {"WORLD_SIZE", "2"}}), ferry::Error);
}

TEST(LocalRanks, EveryRankGetsItsIdentityAndOneRendezvous) {
  const auto r = run("--local-ranks 3");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  // Rank 0 speaks as is; the others are prefixed.
  EXPECT_NE(r.out.find("rank 0 of 3 local 0 launcher torchrun master 127.0.0.1:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[rank 1] rank 1 of 3 local 1 launcher torchrun"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[rank 2] stderr line from rank 2"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("[rank 0]"), std::string::npos) << r.out;
  // One MASTER_PORT for the whole job.
  const auto port_of = [&](const std::string& prefix) {
    const auto at = r.out.find(prefix);
    return at == std::string::npos ? std::string() : r.out.substr(r.out.find("127.0.0.1:", at), 15);
  };
  EXPECT_EQ(port_of("rank 0 of 3"), port_of("rank 2 of 3"));
}

TEST(LocalRanks, OneFailingRankFailsTheJobAndStopsTheOthers) {
  const auto r = run("--local-ranks 4 --fail-rank 2 --fail-code 3");
  EXPECT_EQ(r.exit_code, 3) << r.out;
  EXPECT_NE(r.out.find("rank 2 exited with status 3"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("failed ranks: 2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("stopped ranks: 0,1,3"), std::string::npos) << r.out;
  EXPECT_LT(r.seconds, 20.0) << "the other ranks sleep 30 s; the launcher must stop them";
}

TEST(LocalRanks, DeadlineKillsHangingRanksAndNamesThem) {
  const auto r = run("--local-ranks 3 --hang-rank 1 --timeout-ms 1500");
  EXPECT_NE(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("deadline of 1500 ms passed; ranks still running: 1"), std::string::npos) << r.out;
  EXPECT_LT(r.seconds, 20.0);
}

TEST(LocalRanks, InterruptingTheLauncherStopsEveryRank) {
  const auto t0 = std::chrono::steady_clock::now();
  // The launcher gets SIGINT after a second; its ranks (one of them hanging) must all go with it.
  const auto r = run("--local-ranks 3 --hang-rank 1 --timeout-ms 60000 2>&1 & sleep 1; kill -INT $!; wait $!");
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(r.exit_code, 128 + SIGINT) << r.out;
  EXPECT_NE(r.out.find("interrupted"), std::string::npos) << r.out;
  EXPECT_LT(seconds, 20.0);
}

TEST(LocalRanks, MpirunLauncherGivesAnMpiJob) {
  if (!mpirun_available()) GTEST_SKIP() << "mpirun is not installed";
  const auto r = run("--local-ranks 2 --launcher mpi");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("rank 0 of 2 local 0 launcher mpi"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("rank 1 of 2 local 1 launcher mpi"), std::string::npos) << r.out;
}

TEST(LocalRanks, LaunchOptionsAreStrippedForTheChildren) {
  const char* argv[] = {"tool", "--local-ranks", "8", "--preset", "decode", "--launcher=mpi", "--verify",
                        "--local-nodes", "2", "--local-nodes=4"};
  const auto args = args_without_launch_options(10, argv);
  EXPECT_EQ(args, (std::vector<std::string>{"--preset", "decode", "--verify"}));
}

TEST(LocalNodes, RanksSplitIntoContiguousEqualGroups) {
  std::vector<std::string> eight_as_two, six_as_three;
  for (int r = 0; r < 8; ++r) eight_as_two.push_back(emulated_node_id(r, 8, 2));
  for (int r = 0; r < 6; ++r) six_as_three.push_back(emulated_node_id(r, 6, 3));
  EXPECT_EQ(eight_as_two, (std::vector<std::string>{"local-node-0", "local-node-0", "local-node-0", "local-node-0",
                                                    "local-node-1", "local-node-1", "local-node-1", "local-node-1"}));
  EXPECT_EQ(six_as_three, (std::vector<std::string>{"local-node-0", "local-node-0", "local-node-1", "local-node-1",
                                                    "local-node-2", "local-node-2"}));
  EXPECT_EQ(emulated_node_id(5, 8, 8), "local-node-5");
  EXPECT_EQ(emulated_node_id(7, 8, 1), "local-node-0");
}

TEST(LocalNodes, NodeCountMustBePositiveAndDivideTheRanks) {
  EXPECT_EQ(check_local_nodes(2, 8), "");
  EXPECT_EQ(check_local_nodes(1, 3), "");
  EXPECT_EQ(check_local_nodes(4, 4), "");
  const std::string three_of_four = check_local_nodes(3, 4);
  EXPECT_NE(three_of_four.find("--local-nodes 3"), std::string::npos) << three_of_four;
  EXPECT_NE(three_of_four.find("--local-ranks 4"), std::string::npos) << three_of_four;
  EXPECT_NE(check_local_nodes(8, 4).find("does not divide"), std::string::npos);
  EXPECT_NE(check_local_nodes(0, 4).find("at least 1"), std::string::npos);
  LocalLaunchOptions opt;
  opt.num_ranks = 4;
  opt.local_nodes = 3;
  opt.args = {"--never-started"};
  EXPECT_THROW(run_local_ranks(opt), ferry::Error);
}

TEST(LocalNodes, RankNodesAreDescribedAsRunsOfRanks) {
  EXPECT_EQ(describe_rank_nodes({"local-node-0", "local-node-0", "local-node-1", "local-node-1"}),
            "local-node-0: ranks 0-1; local-node-1: ranks 2-3");
  EXPECT_EQ(describe_rank_nodes({"a", "b", "a"}), "a: rank 0; b: rank 1; a: rank 2");
  EXPECT_EQ(describe_rank_nodes({}), "");
}

namespace {

// Each rank must see its own FERRY_NODE_ID, whichever launcher started it: under mpirun only the rank
// itself knows its rank, so it sets the variable itself.
void expect_ranks_on_nodes(const RunResult& r, int world, int nodes) {
  ASSERT_EQ(r.exit_code, 0) << r.out;
  for (int rank = 0; rank < world; ++rank) {
    const std::string line = "rank " + std::to_string(rank) + " of " + std::to_string(world) + " node local-node-" +
                             std::to_string(rank * nodes / world) + " of " + std::to_string(nodes) + "\n";
    EXPECT_NE(r.out.find(line), std::string::npos) << line << r.out;
  }
}

}  // namespace

TEST(LocalNodes, EveryForkedRankGetsItsNodeId) {
  expect_ranks_on_nodes(run("--local-ranks 4 --local-nodes 2"), 4, 2);
}

TEST(LocalNodes, EveryMpirunRankGetsItsNodeId) {
  if (!mpirun_available()) GTEST_SKIP() << "mpirun is not installed";
  expect_ranks_on_nodes(run("--local-ranks 4 --local-nodes 2 --launcher mpi"), 4, 2);
}

TEST(LocalNodes, FerryNodeIdOfTheUserIsKept) {
  const auto r = run_with_env("FERRY_NODE_ID=rack7", "--local-ranks 2 --local-nodes 2");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("rank 0 of 2 node rack7 of 2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("[rank 1] rank 1 of 2 node rack7 of 2"), std::string::npos) << r.out;
}

TEST(LocalNodes, NodeCountFromTheEnvironmentIsCheckedAgainstTheWorldSize) {
  // mpirun -x FERRY_LOCAL_NODES=3 -np 4, without the launcher's check in front.
  const auto r = run_with_env("FERRY_LOCAL_NODES=3 RANK=1 WORLD_SIZE=4", "");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("FERRY_LOCAL_NODES=3 does not divide the world size 4"), std::string::npos) << r.out;
  const auto bad = run_with_env("FERRY_LOCAL_NODES=two", "");
  EXPECT_EQ(bad.exit_code, 2) << bad.out;
  EXPECT_NE(bad.out.find("FERRY_LOCAL_NODES='two' is not an integer"), std::string::npos) << bad.out;
}

TEST(Report, PercentilesAreMeasuredSamplesInOrder) {
  std::vector<double> samples;
  for (int i = 100; i >= 1; --i) samples.push_back(i);
  const auto p = percentiles(samples);
  EXPECT_EQ(p.count, 100u);
  EXPECT_EQ(p.p50, 50);
  EXPECT_EQ(p.p90, 90);
  EXPECT_EQ(p.p99, 99);
  EXPECT_EQ(p.max, 100);
  EXPECT_EQ(p.min, 1);
  EXPECT_DOUBLE_EQ(p.mean, 50.5);
  EXPECT_EQ(percentiles({7.0}).p99, 7.0);
}

TEST(Report, TableAlignsColumns) {
  Table t;
  t.add_column("op", Table::Align::left);
  t.add_column("p50 us");
  t.add_row({"dispatch", "12.5"});
  t.add_row({"combine", "130.0"});
  EXPECT_EQ(t.render(),
            "op        p50 us\n"
            "----------------\n"
            "dispatch    12.5\n"
            "combine    130.0\n");
  EXPECT_THROW(t.add_row({"a", "b", "c"}), ferry::Error);
}

TEST(Report, BytesAreHumanReadable) {
  EXPECT_EQ(format_bytes(512), "512 B");
  EXPECT_EQ(format_bytes(1536), "1.5 KiB");
  EXPECT_EQ(format_bytes(670.0 * 1024 * 1024), "670.0 MiB");
  EXPECT_EQ(format_bytes(1.9 * 1024 * 1024 * 1024), "1.90 GiB");
}
