// ferry-check over 4 ranks on this machine (tcp over loopback, and shm): a healthy job passes, and
// the JSON report says so field by field.
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <set>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/check/check_process.h"

namespace ferry::testing {
namespace {

using nlohmann::json;

void expect_healthy_report(const json& j, int world, const std::string& nic) {
  EXPECT_EQ(j["summary"]["result"], "PASS");
  EXPECT_EQ(j["summary"]["fail"], 0);
  EXPECT_GT(j["summary"]["pass"].get<int>(), 10);
  EXPECT_EQ(j["world_size"], world);
  ASSERT_EQ(j["hosts"].size(), 1u);

  // Inventory: one entry per rank, in rank order, each using the expected NIC.
  ASSERT_EQ(j["inventory"].size(), size_t(world));
  for (int r = 0; r < world; ++r) {
    const json& inv = j["inventory"][r];
    EXPECT_EQ(inv["rank"], r);
    EXPECT_EQ(inv["local_rank"], r);
    EXPECT_EQ(inv["host"], j["hosts"][0]);
    EXPECT_GT(inv["pid"].get<int>(), 0);
    ASSERT_EQ(inv["nics"].size(), 1u);
    EXPECT_EQ(inv["nics"][0], nic);
    EXPECT_TRUE(inv["missing_nics"].empty());
    bool listed = false;
    for (const json& n : inv["host_nics"]) listed = listed || n["name"] == nic;
    EXPECT_TRUE(listed) << nic << " not in the host's NIC list";
  }

  // Every check has a verdict, and the stages that must run did.
  int loopbacks = 0, alltoalls = 0;
  for (const json& c : j["checks"]) {
    EXPECT_TRUE(c["verdict"] == "PASS" || c["verdict"] == "SKIP") << c.dump();
    if (c["verdict"] == "SKIP") {
      EXPECT_FALSE(c["reason"].get<std::string>().empty()) << c.dump();
    }
    if (c["stage"] == "nic_loopback") {
      ++loopbacks;
      EXPECT_EQ(c["verdict"], "PASS");
      EXPECT_GT(c["metrics"]["bytes"].get<int>(), 0);
      EXPECT_EQ(c["metrics"]["nic"], nic);
    }
    if (c["stage"] == "alltoall") ++alltoalls;
  }
  EXPECT_EQ(loopbacks, world);
  EXPECT_EQ(alltoalls, 6);

  // Links: every ordered pair exactly once, measured and verified.
  ASSERT_EQ(j["links"].size(), size_t(world * (world - 1)));
  std::set<std::pair<int, int>> seen;
  for (const json& l : j["links"]) {
    EXPECT_TRUE(seen.insert({l["src"].get<int>(), l["dst"].get<int>()}).second);
    EXPECT_NE(l["src"], l["dst"]);
    EXPECT_EQ(l["slot"], 0);
    EXPECT_TRUE(l["ok"].get<bool>()) << l.dump();
    EXPECT_TRUE(l["verified"].get<bool>()) << l.dump();
    EXPECT_FALSE(l["slow"].get<bool>());
    EXPECT_GT(l["gbps"].get<double>(), 0);
    EXPECT_GT(l["latency_us_p50"].get<double>(), 0);
    EXPECT_GE(l["latency_us_p99"].get<double>(), l["latency_us_p50"].get<double>());
    EXPECT_EQ(l["src_nic"], nic);
    EXPECT_EQ(l["dst_nic"], nic);
  }
  const json& m = j["matrices"]["0"]["gbps"];
  ASSERT_EQ(m.size(), size_t(world));
  for (int a = 0; a < world; ++a) {
    ASSERT_EQ(m[a].size(), size_t(world));
    for (int b = 0; b < world; ++b) {
      if (a == b) {
        EXPECT_TRUE(m[a][b].is_null());
      } else {
        EXPECT_GT(m[a][b].get<double>(), 0);
      }
    }
  }

  // All-to-all: three routings of two shapes, every one verified, with timings.
  ASSERT_EQ(j["alltoall"].size(), 6u);
  std::set<std::string> routings, shapes;
  for (const json& a : j["alltoall"]) {
    EXPECT_TRUE(a["ok"].get<bool>()) << a.dump();
    routings.insert(a["routing"].get<std::string>());
    shapes.insert(a["shape"].get<std::string>());
    EXPECT_EQ(a["num_experts"].get<int>() % world, 0);
    EXPECT_GT(a["bytes_checked"].get<uint64_t>(), 0u);
    EXPECT_GT(a["dispatch_us_p50"].get<double>(), 0);
    EXPECT_GE(a["dispatch_us_p99"].get<double>(), a["dispatch_us_p50"].get<double>());
    EXPECT_GT(a["combine_us_p50"].get<double>(), 0);
    EXPECT_GE(a["combine_us_p99"].get<double>(), a["combine_us_p50"].get<double>());
  }
  EXPECT_EQ(routings, (std::set<std::string>{"uniform", "skewed", "all_to_one"}));
  EXPECT_EQ(shapes, (std::set<std::string>{"decode", "wide"}));
}

TEST(CheckLocal, FourRanksOverTcpPass) {
  const std::string dir = make_temp_dir("tcp");
  const ProcessResult r = run_process(small_check_run("tcp", dir + "/report.json"), 55000);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("PASS"), std::string::npos);
  const json j = json::parse(read_text(dir + "/report.json"));
  EXPECT_EQ(j["provider"], "tcp");
  expect_healthy_report(j, 4, "lo");
}

TEST(CheckLocal, FourRanksOverShmPass) {
  const std::string dir = make_temp_dir("shm");
  const ProcessResult r = run_process(small_check_run("shm", dir + "/report.json"), 55000);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json j = json::parse(read_text(dir + "/report.json"));
  EXPECT_EQ(j["provider"], "shm");
  expect_healthy_report(j, 4, "shm");
}

TEST(CheckLocal, ThresholdsTheJobCannotMeetFail) {
  const std::string dir = make_temp_dir("threshold");
  std::vector<std::string> argv = small_check_run("tcp", dir + "/report.json");
  argv[2] = "2";  // --local-ranks 2
  argv.insert(argv.end(), {"--no-links", "--max-dispatch-us", "0.001"});
  const ProcessResult r = run_process(argv, 55000);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  const json j = json::parse(read_text(dir + "/report.json"));
  EXPECT_EQ(j["summary"]["result"], "FAIL");
  int over = 0;
  for (const json& c : j["checks"])
    if (c["stage"] == "alltoall" && c["verdict"] == "FAIL" &&
        c["reason"].get<std::string>().find("over --max-dispatch-us") != std::string::npos)
      ++over;
  EXPECT_EQ(over, 6);
}

}  // namespace
}  // namespace ferry::testing

namespace ferry::testing {
namespace {

TEST(CheckLocal, KilledRankIsReportedAndTheJobFails) {
  const std::string dir = make_temp_dir("killed");
  std::vector<std::string> argv = small_check_run("tcp", dir + "/report.json");
  argv[6] = "3000";  // --timeout-ms
  argv.insert(argv.end(), {"--debug-die-at", "links", "--debug-die-rank", "2"});
  const ProcessResult r = run_process(argv, 58000);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("rank 2 died of signal 9"), std::string::npos) << r.output;
  const json j = json::parse(read_text(dir + "/report.json"));
  EXPECT_EQ(j["summary"]["result"], "FAIL");
  bool liveness = false, skipped_after = false;
  for (const json& c : j["checks"]) {
    if (c["stage"] == "liveness" && c["verdict"] == "FAIL")
      liveness = c["reason"].get<std::string>().find("rank 2") != std::string::npos;
    if (c["stage"] == "alltoall" && c["verdict"] == "SKIP") skipped_after = true;
  }
  EXPECT_TRUE(liveness) << j["checks"].dump(1);
  EXPECT_TRUE(skipped_after) << j["checks"].dump(1);
}

// A rank that stops (SIGSTOP: alive, silent) under the mpirun launcher: the others time out on it,
// say so naming it, and leave without waiting for it in MPI_Finalize, so the job ends long before
// the launcher's own deadline.
TEST(CheckLocal, AStoppedRankUnderMpirunEndsTheJobWithinItsDeadlineNamingIt) {
  if (run_process({"sh", "-c", "command -v mpirun"}, 10000).exit_code != 0) {
    GTEST_SKIP() << "mpirun is not installed";
  }
  const std::string dir = make_temp_dir("stopped");
  const std::string marker = "stopped-rank-" + std::to_string(::getpid());
  constexpr int kTimeoutMs = 3000;
  Process job({ferry_check_binary(), "--local-ranks", "3", "--launcher", "mpi", "--provider", "tcp",
               "--nics", "lo", "--timeout-ms", std::to_string(kTimeoutMs), "--latency-iters", "50000",
               "--bw-bytes", "131072", "--a2a-tokens", "16", "--a2a-decode-hidden", "256",
               "--a2a-wide-hidden", "1024", "--outlier-ratio", "0", "--no-nccl", "--json",
               dir + "/report.json"},
              {{"FERRY_TEST_MARKER", marker}});
  const auto start = std::chrono::steady_clock::now();
  std::vector<pid_t> rank2;
  while (rank2.empty() && std::chrono::steady_clock::now() - start < std::chrono::seconds(30)) {
    rank2 = processes_with_env({{"FERRY_TEST_MARKER", marker}, {"OMPI_COMM_WORLD_RANK", "2"}});
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(rank2.size(), 1u) << "rank 2 of the mpirun job never showed up";
  std::this_thread::sleep_for(std::chrono::seconds(3));  // into the link checks
  ASSERT_EQ(::kill(rank2[0], SIGSTOP), 0);
  const ProcessResult r =
      job.wait(std::chrono::steady_clock::now() + std::chrono::milliseconds(20 * kTimeoutMs));
  ::kill(rank2[0], SIGKILL);
  EXPECT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("rank 2"), std::string::npos) << r.output;
  EXPECT_EQ(json::parse(read_text(dir + "/report.json"))["summary"]["result"], "FAIL");
}

}  // namespace
}  // namespace ferry::testing

namespace ferry::testing {
namespace {

TEST(CheckLocal, EarlierReportRendersAgainWithItsVerdict) {
  const std::string dir = make_temp_dir("from-json");
  const json report = {
      {"world_size", 2},
      {"provider", "tcp"},
      {"checks", {{{"stage", "links"}, {"name", "rank 0 -> rank 1 on fnic1"}, {"verdict", "FAIL"},
                   {"reason", "slow link on fnic1"}, {"metrics", json::object()}},
                  {{"stage", "inventory"}, {"name", "host a: NICs"}, {"verdict", "PASS"}, {"reason", ""},
                   {"metrics", json::object()}}}},
      {"links", {{{"slot", 1}, {"src", 0}, {"dst", 1}, {"ok", true}, {"gbps", 0.02}, {"slow", true}}}}};
  std::ofstream(dir + "/in.json") << report.dump();
  const ProcessResult r =
      run_process({ferry_check_binary(), "--from-json", dir + "/in.json", "--html", dir + "/out.html"}, 20000);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("slow link on fnic1"), std::string::npos) << r.output;
  const std::string html = read_text(dir + "/out.html");
  EXPECT_NE(html.find("id=\"bandwidth-slot-1\""), std::string::npos);
  EXPECT_NE(html.find("class=\"slow\""), std::string::npos);
}

}  // namespace
}  // namespace ferry::testing

namespace ferry::testing {
namespace {

// --local-nodes: the ranks of this machine play two nodes; every rank's node is in the inventory.
TEST(CheckLocal, FourRanksAsTwoNodesAreNamedInTheReport) {
  const std::string dir = make_temp_dir("nodes");
  std::vector<std::string> argv = small_check_run("tcp", dir + "/report.json");
  argv.insert(argv.end(), {"--local-nodes", "2", "--no-links", "--no-nccl"});
  const ProcessResult r = run_process(argv, 55000);
  ASSERT_FALSE(r.timed_out) << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string line =
      "nodes: 2 (emulated on one machine, FERRY_NODE_ID): local-node-0: ranks 0-1; local-node-1: ranks 2-3";
  EXPECT_NE(r.output.find(line), std::string::npos) << r.output;
  const json j = json::parse(read_text(dir + "/report.json"));
  EXPECT_EQ(j["summary"]["result"], "PASS");
  EXPECT_EQ(j["options"]["local_nodes"], 2);
  EXPECT_EQ(j["nodes"], json({"local-node-0", "local-node-1"}));
  EXPECT_EQ(j["nodes_note"], line);
  ASSERT_EQ(j["inventory"].size(), 4u);
  for (int rank = 0; rank < 4; ++rank) {
    EXPECT_EQ(j["inventory"][rank]["node_id"], rank < 2 ? "local-node-0" : "local-node-1") << rank;
  }
}

TEST(CheckLocal, LocalNodesThatDoNotSplitTheRanksAreRejected) {
  const std::pair<std::vector<std::string>, std::string> cases[] = {
      {{"--local-nodes", "2"}, "--local-nodes 2 is only used with --local-ranks"},
      {{"--local-ranks", "4", "--local-nodes", "3"}, "--local-nodes 3 does not divide --local-ranks 4"},
      {{"--local-ranks", "4", "--local-nodes", "0"}, "--local-nodes must be at least 1"},
  };
  for (const auto& [args, message] : cases) {
    std::vector<std::string> argv{ferry_check_binary()};
    argv.insert(argv.end(), args.begin(), args.end());
    const ProcessResult r = run_process(argv, 20000);
    EXPECT_EQ(r.exit_code, 2) << message << "\n" << r.output;
    EXPECT_NE(r.output.find(message), std::string::npos) << r.output;
  }
}

}  // namespace
}  // namespace ferry::testing
