// ferry-check across network-namespace "hosts" (one rank per host, two NICs each, provider tcp on
// fnic0/fnic1): a rate-limited link is named as slow, a downed NIC is named, and a killed rank is
// reported by the others, who exit non-zero within the deadline instead of hanging.
#include <gtest/gtest.h>

#include <memory>
#include <nlohmann/json.hpp>

#include "tests/check/check_process.h"
#include "tests/common/multiprocess.h"
#include "tests/common/netns.h"

namespace ferry::testing {
namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr int kTimeoutMs = 4000;

class CheckNetns : public ::testing::Test {
 protected:
  void SetUp() override {
    const NetnsAvailability a = NetnsCluster::available();
    if (!a.ok) GTEST_SKIP() << "network namespaces unavailable: " << a.reason;
    dir_ = make_temp_dir(::testing::UnitTest::GetInstance()->current_test_info()->name());
  }

  static std::string host_name(int h) { return "host" + std::to_string(h); }

  // One ferry-check per host, inside the host's namespace and with its own host name (a UTS
  // namespace), so the report tells the hosts apart as it would on a cluster.
  std::vector<ProcessResult> run_cluster(NetnsCluster& cluster, std::vector<std::string> args, int deadline_ms) {
    auto procs = start_cluster(cluster, std::move(args));
    const auto deadline = Clock::now() + std::chrono::milliseconds(deadline_ms);
    std::vector<ProcessResult> out;
    for (auto& p : procs) out.push_back(p->wait(deadline));
    return out;
  }

  std::vector<std::unique_ptr<Process>> start_cluster(NetnsCluster& cluster, std::vector<std::string> args) {
    const int world = cluster.hosts();
    const std::string port = std::to_string(pick_free_port());
    std::vector<std::unique_ptr<Process>> procs;
    for (int h = 0; h < world; ++h) {
      std::vector<std::string> argv = {"ip", "netns", "exec", cluster.netns(h), "unshare", "--uts", "--", "sh", "-c",
                                       "hostname \"$0\" && exec \"$@\"", host_name(h), ferry_check_binary()};
      argv.insert(argv.end(), args.begin(), args.end());
      procs.push_back(std::make_unique<Process>(
          argv, std::map<std::string, std::string>{{"RANK", std::to_string(h)},
                                                   {"WORLD_SIZE", std::to_string(world)},
                                                   {"LOCAL_RANK", "0"},
                                                   {"LOCAL_WORLD_SIZE", "1"},
                                                   {"MASTER_ADDR", cluster.address(0, 0)},
                                                   {"MASTER_PORT", port}}));
    }
    return procs;
  }

  // bw_bytes x bw_iters stays under what a 20 Mbit/s token bucket queues within its 100 ms
  // latency, so a rate-limited link is slow but never drops into TCP retransmission backoff.
  std::vector<std::string> base_args(int nics, int timeout_ms = kTimeoutMs) const {
    std::vector<std::string> a = {"--provider", "tcp", "--nics", nics == 2 ? "fnic0,fnic1" : "fnic0",
                                  "--expect-nics-per-node", std::to_string(nics), "--timeout-ms",
                                  std::to_string(timeout_ms), "--latency-iters", "20", "--bw-bytes", "65536",
                                  "--bw-iters", "2", "--bw-reps", "2", "--loopback-bytes", "65536", "--a2a-tokens", "8",
                                  "--a2a-decode-hidden", "256", "--a2a-wide-hidden", "512", "--a2a-iters", "1",
                                  "--no-nccl", "--json", dir_ + "/report.json", "--html", dir_ + "/report.html"};
    return a;
  }

  static std::string all_output(const std::vector<ProcessResult>& rs) {
    std::string s;
    for (size_t i = 0; i < rs.size(); ++i) s += "---- rank " + std::to_string(i) + " ----\n" + rs[i].output;
    return s;
  }

  std::string dir_;
};

TEST_F(CheckNetns, RateLimitedLinkIsNamedAsSlow) {
  NetnsCluster cluster(3, 2);
  cluster.set_rate(1, 1, "20mbit");  // host1's second NIC: every link through it
  // 20 Mbit/s against the ~1 Gbit/s a veth carries on a busy CI machine: a ratio of 0.1 leaves a
  // wide margin on both sides, however noisy the healthy links are.
  std::vector<std::string> args = base_args(2, 3 * kTimeoutMs);
  args.insert(args.end(), {"--outlier-ratio", "0.1"});
  const auto rs = run_cluster(cluster, args, 100000);
  for (const auto& r : rs) ASSERT_FALSE(r.timed_out) << all_output(rs);
  EXPECT_EQ(rs[0].exit_code, 1) << all_output(rs);
  const json j = json::parse(read_text(dir_ + "/report.json"));
  EXPECT_EQ(j["summary"]["result"], "FAIL");
  EXPECT_EQ(j["hosts"], json({"host0", "host1", "host2"}));

  // Exactly the links through host1's fnic1 are slow; everything else measured fine.
  ASSERT_EQ(j["links"].size(), 12u);  // 2 slots x 3 x 2 directed links
  for (const json& l : j["links"]) {
    const bool through_slowed = l["slot"] == 1 && (l["src_host"] == "host1" || l["dst_host"] == "host1");
    EXPECT_TRUE(l["ok"].get<bool>()) << l.dump();
    EXPECT_EQ(l["slow"].get<bool>(), through_slowed) << l.dump();
    if (through_slowed) {
      EXPECT_LT(l["gbps"].get<double>(), 0.05) << l.dump();
    }
  }
  // The summary names the link: ranks, hosts and the NIC.
  int named = 0;
  for (const json& c : j["checks"]) {
    if (c["verdict"] != "FAIL") continue;
    const std::string reason = c["reason"];
    EXPECT_EQ(c["stage"], "links") << c.dump();  // nothing but the slow links fails
    if (reason.find("host1, fnic1") != std::string::npos && reason.find("slow link") != std::string::npos) ++named;
  }
  EXPECT_EQ(named, 4);
  // The all-to-all is still correct over the slow link.
  for (const json& a : j["alltoall"]) EXPECT_TRUE(a["ok"].get<bool>()) << a.dump();
  const std::string html = read_text(dir_ + "/report.html");
  EXPECT_NE(html.find("class=\"slow\""), std::string::npos);
}

TEST_F(CheckNetns, DownedNicIsNamed) {
  NetnsCluster cluster(3, 2);
  cluster.set_down(1, 1);
  std::vector<std::string> args = base_args(2);
  args.push_back("--no-alltoall");
  const auto start = Clock::now();
  const auto rs = run_cluster(cluster, args, 100000);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (const auto& r : rs) ASSERT_FALSE(r.timed_out) << all_output(rs);
  EXPECT_EQ(rs[0].exit_code, 1) << all_output(rs);
  // Two rounds touch host1 on slot 1; each may cost a deadline on each side of the pair.
  EXPECT_LT(seconds, 60.0);
  const json j = json::parse(read_text(dir_ + "/report.json"));
  bool link_down_named = false;
  int failed_links = 0;
  for (const json& c : j["checks"]) {
    if (c["verdict"] != "FAIL") continue;
    const std::string reason = c["reason"];
    if (c["stage"] == "inventory") {
      EXPECT_NE(reason.find("fnic1"), std::string::npos) << reason;
      EXPECT_NE(reason.find("host1"), std::string::npos) << reason;
      link_down_named = true;
    }
    if (c["stage"] == "links" && reason.find("host1, fnic1") != std::string::npos) ++failed_links;
  }
  EXPECT_TRUE(link_down_named) << j["checks"].dump(1);
  EXPECT_GE(failed_links, 2) << j["checks"].dump(1);
  for (const json& l : j["links"]) {
    const bool through_down = l["slot"] == 1 && (l["src_host"] == "host1" || l["dst_host"] == "host1");
    EXPECT_EQ(l["ok"].get<bool>(), !through_down) << l.dump();
  }
}

TEST_F(CheckNetns, StalledLinkTimesOutAndOnlyItIsBlamed) {
  NetnsCluster cluster(3, 2);
  // 1 kbit/s: the first few packets fit the token bucket, then the link carries nothing, like a NIC
  // that went dark in the middle of the run.
  cluster.set_rate(1, 1, "1kbit");
  std::vector<std::string> args = base_args(2);
  args.push_back("--no-alltoall");
  const auto start = Clock::now();
  const auto rs = run_cluster(cluster, args, 100000);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (const auto& r : rs) ASSERT_FALSE(r.timed_out) << all_output(rs);
  EXPECT_EQ(rs[0].exit_code, 1) << all_output(rs);
  // Per slot-1 round with host1: at most a failed ping-pong and a failed bulk wait.
  EXPECT_LT(seconds, 8.0 * kTimeoutMs / 1000 + 20) << all_output(rs);
  const json j = json::parse(read_text(dir_ + "/report.json"));
  ASSERT_EQ(j["links"].size(), 12u) << all_output(rs);
  for (const json& l : j["links"]) {
    const bool through_stalled = l["slot"] == 1 && (l["src_host"] == "host1" || l["dst_host"] == "host1");
    EXPECT_EQ(l["ok"].get<bool>(), !through_stalled) << l.dump();
    if (through_stalled) {
      EXPECT_NE(l["error"].get<std::string>().find("timed out"), std::string::npos) << l.dump();
    }
  }
  int named = 0;
  for (const json& c : j["checks"])
    if (c["verdict"] == "FAIL" && c["reason"].get<std::string>().find("host1, fnic1") != std::string::npos) ++named;
  EXPECT_EQ(named, 4) << j["checks"].dump(1);
}

TEST_F(CheckNetns, KilledRankIsReportedByTheOthers) {
  NetnsCluster cluster(3, 1);
  std::vector<std::string> args = base_args(1);
  args.insert(args.end(), {"--debug-die-at", "links", "--debug-die-rank", "2"});
  const auto start = Clock::now();
  const auto rs = run_cluster(cluster, args, 100000);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (const auto& r : rs) ASSERT_FALSE(r.timed_out) << all_output(rs);
  EXPECT_EQ(rs[2].term_signal, 9) << all_output(rs);
  EXPECT_NE(rs[0].exit_code, 0) << all_output(rs);
  EXPECT_NE(rs[1].exit_code, 0) << all_output(rs);
  EXPECT_LT(seconds, 8.0 * kTimeoutMs / 1000 + 20) << all_output(rs);
  EXPECT_NE(rs[1].output.find("rank 2"), std::string::npos) << rs[1].output;
  const json j = json::parse(read_text(dir_ + "/report.json"));
  EXPECT_EQ(j["summary"]["result"], "FAIL");
  bool named = false;
  for (const json& c : j["checks"]) {
    if (c["stage"] == "liveness" && c["verdict"] == "FAIL") {
      const std::string reason = c["reason"];
      named = reason.find("rank 2") != std::string::npos && reason.find("host2") != std::string::npos;
    }
  }
  EXPECT_TRUE(named) << j["checks"].dump(1);
}

TEST_F(CheckNetns, HungRankIsReportedWithinTheDeadline) {
  NetnsCluster cluster(3, 1);
  std::vector<std::string> args = base_args(1);
  args.insert(args.end(), {"--debug-hang-at", "links", "--debug-die-rank", "2"});
  const auto start = Clock::now();
  auto procs = start_cluster(cluster, args);
  // The others must give up on the silent rank by themselves; the hung one is killed afterwards.
  const auto deadline = start + std::chrono::milliseconds(8 * kTimeoutMs + 20000);
  const ProcessResult r0 = procs[0]->wait(deadline);
  const ProcessResult r1 = procs[1]->wait(deadline);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  procs.clear();
  ASSERT_FALSE(r0.timed_out) << r0.output;
  ASSERT_FALSE(r1.timed_out) << r1.output;
  EXPECT_NE(r0.exit_code, 0) << r0.output;
  EXPECT_NE(r1.exit_code, 0) << r1.output;
  EXPECT_LT(seconds, 8.0 * kTimeoutMs / 1000 + 20);
  const json j = json::parse(read_text(dir_ + "/report.json"));
  bool named = false;
  for (const json& c : j["checks"]) {
    if (c["verdict"] != "FAIL") continue;
    const std::string reason = c["reason"];
    named = named || (reason.find("rank 2") != std::string::npos && reason.find("host2") != std::string::npos);
  }
  EXPECT_TRUE(named) << j["checks"].dump(1);
}

}  // namespace
}  // namespace ferry::testing
