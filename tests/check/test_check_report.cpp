// The report model on its own: the JSON round trip, the link matrices, the verdict arithmetic,
// the HTML page's self-containment, and the round-robin schedule the link checks follow.
#include <gtest/gtest.h>

#include <set>

#include "tools/check/check.h"

namespace ferry::check {
namespace {

Report sample_report() {
  Report r;
  r.version = "0.1";
  r.provider = "tcp";
  r.world_size = 3;
  r.hosts = {"host0", "host1"};
  RankInventory inv;
  inv.rank = 0;
  inv.host = "host0";
  inv.nics = {"fnic0"};
  inv.host_nics = {NicInfo{"fnic0", "tcp;ofi_rxm", "198.18.0.0/24", 10.0, "sysfs", "up", "", -1}};
  r.inventory.push_back(inv);
  r.add(CheckResult{"inventory", "host host0: NICs", Verdict::pass, "", nlohmann::json::object()});
  r.add(CheckResult{"links", "rank 0 -> rank 1 on fnic0", Verdict::fail, "slow <script>", nlohmann::json{{"gbps", 0.1}}});
  r.add(CheckResult{"nccl", "all_reduce", Verdict::skip, "no GPU", nlohmann::json::object()});
  LinkResult l;
  l.slot = 0;
  l.src = 0;
  l.dst = 1;
  l.src_host = "host0";
  l.dst_host = "host1";
  l.src_nic = l.dst_nic = "fnic0";
  l.ok = true;
  l.gbps = 0.1;
  l.latency_us_p50 = 40;
  l.slow = true;
  r.links.push_back(l);
  l.src = 1;
  l.dst = 0;
  l.gbps = 9.5;
  l.slow = false;
  r.links.push_back(l);
  AlltoallResult a;
  a.shape = "decode";
  a.routing = "uniform";
  a.device = "cuda";
  a.ok = true;
  a.dispatch_us_p50 = 10;
  r.alltoall.push_back(a);
  return r;
}

TEST(CheckReport, OneFailMakesTheWholeReportFail) {
  Report r = sample_report();
  EXPECT_FALSE(r.passed());
  EXPECT_EQ(r.count(Verdict::fail), 1);
  r.checks[1].verdict = Verdict::pass;
  EXPECT_TRUE(r.passed());
}

TEST(CheckReport, OnlySkipsIsNotAPass) {
  Report r;
  r.add(CheckResult{"nccl", "x", Verdict::skip, "no GPU", nlohmann::json::object()});
  EXPECT_FALSE(r.passed());
}

TEST(CheckReport, JsonRoundTripKeepsEveryField) {
  const Report r = sample_report();
  const nlohmann::json j = report_to_json(r);
  const Report back = report_from_json(nlohmann::json::parse(j.dump()));
  EXPECT_EQ(report_to_json(back), j);
  EXPECT_EQ(j["summary"]["result"], "FAIL");
  EXPECT_EQ(j["summary"]["fail"], 1);
  EXPECT_EQ(j["checks"][1]["verdict"], "FAIL");
  EXPECT_EQ(j["inventory"][0]["host_nics"][0]["link_gbps"], 10.0);
}

TEST(CheckReport, AlltoallNamesItsBackendAndEarlierReportsReadAsHost) {
  const nlohmann::json j = report_to_json(sample_report());
  EXPECT_EQ(j["alltoall"][0]["device"], "cuda");
  EXPECT_EQ(report_from_json(j).alltoall.at(0).device, "cuda");
  EXPECT_NE(render_html(sample_report()).find("<th>device</th>"), std::string::npos);
  // Reports written before --a2a-device existed ran the host backend.
  nlohmann::json older = j;
  older["alltoall"][0].erase("device");
  EXPECT_EQ(report_from_json(older).alltoall.at(0).device, "host");
}

TEST(CheckReport, MatricesAreWorldByWorldWithNullWhereNotMeasured) {
  const nlohmann::json j = report_to_json(sample_report());
  const auto& m = j["matrices"]["0"]["gbps"];
  ASSERT_EQ(m.size(), 3u);
  for (const auto& row : m) ASSERT_EQ(row.size(), 3u);
  EXPECT_EQ(m[0][1], 0.1);
  EXPECT_EQ(m[1][0], 9.5);
  EXPECT_TRUE(m[0][0].is_null());
  EXPECT_TRUE(m[2][0].is_null());
  EXPECT_EQ(j["matrices"]["0"]["latency_us"][0][1], 40.0);
  // An unmeasured number is null, never a made-up zero.
  EXPECT_TRUE(j["alltoall"][0]["combine_us_p50"].is_null());
}

TEST(CheckReport, HtmlIsSelfContainedAndEscapesText) {
  const std::string html = render_html(sample_report());
  EXPECT_NE(html.find("<style>"), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);  // the reason text "<script>" is escaped
  EXPECT_NE(html.find("slow &lt;script&gt;"), std::string::npos);
  EXPECT_EQ(html.find("http://"), std::string::npos);
  EXPECT_EQ(html.find("https://"), std::string::npos);
  EXPECT_NE(html.find("id=\"bandwidth-slot-0\""), std::string::npos);
  EXPECT_NE(html.find("class=\"slow\""), std::string::npos);
  EXPECT_NE(html.find("id=\"inventory-table\""), std::string::npos);
  EXPECT_NE(html.find("id=\"summary-table\""), std::string::npos);
}

TEST(CheckReport, SummaryTableNamesEveryFailureReason) {
  const std::string table = summary_table(sample_report());
  EXPECT_NE(table.find("FAIL"), std::string::npos);
  EXPECT_NE(table.find("slow <script>"), std::string::npos);
  EXPECT_NE(table.find("1 passed, 1 failed, 1 skipped: FAIL"), std::string::npos);
}

TEST(CheckReport, SlowLinksAreJudgedAgainstTheMedianOfTheirKind) {
  Options opt;
  opt.outlier_ratio = 0.5;
  Report r;
  r.world_size = 3;
  auto link = [&](int slot, int src, int dst, double gbps) {
    LinkResult l;
    l.slot = slot;
    l.src = src;
    l.dst = dst;
    l.src_host = "host" + std::to_string(src);
    l.dst_host = "host" + std::to_string(dst);
    l.src_nic = l.dst_nic = "fnic" + std::to_string(slot);
    l.ok = true;
    l.gbps = gbps;
    r.links.push_back(l);
  };
  for (int slot = 0; slot < 2; ++slot)
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b)
        if (a != b) link(slot, a, b, slot == 1 && (a == 1 || b == 1) ? 0.02 : 5.0);
  judge_links(opt, r);
  for (const LinkResult& l : r.links) EXPECT_EQ(l.slow, l.slot == 1 && (l.src == 1 || l.dst == 1)) << l.src << "->" << l.dst;
  int named = 0;
  for (const CheckResult& c : r.checks)
    if (c.verdict == Verdict::fail && c.reason.find("host1, fnic1") != std::string::npos) ++named;
  EXPECT_EQ(named, 4);
}

RankInventory rank_on(int rank, const std::string& host, std::vector<std::string> nics) {
  RankInventory inv;
  inv.rank = rank;
  inv.host = host;
  inv.nics = std::move(nics);
  for (const char* n : {"fnic0", "fnic1"}) inv.host_nics.push_back(NicInfo{n, "tcp", "", 100, "sysfs", "up", "", 0});
  return inv;
}

const CheckResult* find_check(const std::vector<CheckResult>& checks, const std::string& name) {
  for (const CheckResult& c : checks)
    if (c.name == name) return &c;
  return nullptr;
}

TEST(CheckInventory, RanksSharingANicTheHostHasSpareAreFlagged) {
  const std::vector<RankInventory> all = {rank_on(0, "h", {"fnic0"}), rank_on(1, "h", {"fnic0"})};
  const auto checks = judge_inventory(Options{}, all);
  const CheckResult* c = find_check(checks, "host h: NIC assignment");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->verdict, Verdict::fail);
  EXPECT_NE(c->reason.find("ranks 0, 1 share NIC fnic0"), std::string::npos) << c->reason;
}

TEST(CheckInventory, SharingIsExpectedWhenTheHostHasTooFewNics) {
  const std::vector<RankInventory> all = {rank_on(0, "h", {"fnic0", "fnic1"}), rank_on(1, "h", {"fnic0", "fnic1"})};
  const auto checks = judge_inventory(Options{}, all);
  EXPECT_EQ(find_check(checks, "host h: NIC assignment")->verdict, Verdict::pass);
}

TEST(CheckInventory, FewerNicsThanExpectedNamesTheMissingOne) {
  std::vector<RankInventory> all = {rank_on(0, "a", {"fnic0"}), rank_on(1, "b", {"fnic0"})};
  all[1].host_nics.pop_back();  // host b lost fnic1
  Options opt;
  opt.expect_nics_per_node = 2;
  const auto checks = judge_inventory(opt, all);
  EXPECT_EQ(find_check(checks, "host a: NICs")->verdict, Verdict::pass);
  const CheckResult* b = find_check(checks, "host b: NICs");
  EXPECT_EQ(b->verdict, Verdict::fail);
  EXPECT_NE(b->reason.find("missing NIC(s): fnic1"), std::string::npos) << b->reason;
  EXPECT_NE(b->reason.find("1 NIC(s) found, expected 2"), std::string::npos) << b->reason;
}

TEST(CheckInventory, NicFartherThanTheNearestIsFlagged) {
  RankInventory r = rank_on(0, "g", {"fnic1"});
  r.gpu = 0;
  r.host_gpus = {GpuInfo{0, "H100", "0000:53:00.0", 0}};
  r.near_nics = {"fnic0"};
  r.nic_paths = {"SYS"};
  const auto checks = judge_inventory(Options{}, {r});
  const CheckResult* c = find_check(checks, "rank 0: NIC near GPU");
  EXPECT_EQ(c->verdict, Verdict::fail);
  EXPECT_NE(c->reason.find("uses NIC fnic1 (SYS from GPU 0), nearest: fnic0"), std::string::npos) << c->reason;
}

TEST(CheckInventory, DownLinkOfAUsedNicIsNamed) {
  RankInventory r = rank_on(0, "d", {"fnic0", "fnic1"});
  r.host_nics[1].link_state = "down";
  const auto checks = judge_inventory(Options{}, {r});
  const CheckResult* c = find_check(checks, "host d: NIC links up");
  EXPECT_EQ(c->verdict, Verdict::fail);
  EXPECT_NE(c->reason.find("NIC fnic1 on host d"), std::string::npos) << c->reason;
}

// Four ranks of one machine with the node ids --local-nodes gives them (or the user's own).
Report four_ranks_on_nodes(const std::vector<std::string>& node_ids, int local_nodes) {
  Report r;
  r.world_size = 4;
  r.hosts = {"vm"};
  r.options = nlohmann::json{{"local_nodes", local_nodes}};
  for (int rank = 0; rank < 4; ++rank) {
    RankInventory inv;
    inv.rank = rank;
    inv.local_rank = rank;
    inv.host = "vm";
    inv.node_id = node_ids[size_t(rank)];
    r.inventory.push_back(inv);
  }
  return r;
}

TEST(CheckNodes, EmulatedNodesAreNamedInTheInventoryAndTheJson) {
  const Report r = four_ranks_on_nodes({"local-node-0", "local-node-0", "local-node-1", "local-node-1"}, 2);
  const std::string line =
      "nodes: 2 (emulated on one machine, FERRY_NODE_ID): local-node-0: ranks 0-1; local-node-1: ranks 2-3";
  EXPECT_EQ(nodes_line(r), line);
  const std::string table = inventory_table(r);
  EXPECT_NE(table.find("node"), std::string::npos) << table;
  EXPECT_NE(table.find("local-node-1"), std::string::npos) << table;
  EXPECT_NE(table.find(line), std::string::npos) << table;
  const nlohmann::json j = report_to_json(r);
  EXPECT_EQ(j["nodes"], nlohmann::json({"local-node-0", "local-node-1"}));
  EXPECT_EQ(j["nodes_note"], line);
  EXPECT_EQ(j["inventory"][2]["node_id"], "local-node-1");
  // An earlier report renders with the same nodes.
  EXPECT_EQ(nodes_line(report_from_json(j)), line);
  EXPECT_NE(render_html(r).find("id=\"nodes\""), std::string::npos);
}

TEST(CheckNodes, NodeIdOfTheUserIsNotCalledEmulated) {
  const Report r = four_ranks_on_nodes({"rack7", "rack7", "rack7", "rack7"}, 2);
  EXPECT_EQ(nodes_line(r), "nodes: 1 (FERRY_NODE_ID from the environment, which wins over --local-nodes 2): "
                           "rack7: ranks 0-3");
}

TEST(CheckNodes, WithoutNodeIdsHostsAreTheNodesAndNothingIsAdded) {
  const Report r = four_ranks_on_nodes({"", "", "", ""}, 0);
  EXPECT_EQ(nodes_line(r), "");
  EXPECT_EQ(inventory_table(r).find("node"), std::string::npos) << inventory_table(r);
  EXPECT_EQ(report_to_json(r)["nodes"], nlohmann::json({"vm"}));
  EXPECT_EQ(render_html(r).find("id=\"nodes\""), std::string::npos);
}

TEST(CheckSchedule, EveryPairMeetsExactlyOnceAndNobodyTwicePerRound) {
  for (int world = 1; world <= 9; ++world) {
    std::set<std::pair<int, int>> met;
    for (int round = 0; round < num_rounds(world); ++round) {
      for (int r = 0; r < world; ++r) {
        const int p = round_partner(r, round, world);
        if (p < 0) continue;
        ASSERT_NE(p, r);
        ASSERT_EQ(round_partner(p, round, world), r) << "world " << world << " round " << round;
        if (r < p) {
          ASSERT_TRUE(met.insert({r, p}).second) << "pair met twice";
        }
      }
    }
    EXPECT_EQ(int(met.size()), world * (world - 1) / 2) << "world " << world;
  }
}

}  // namespace
}  // namespace ferry::check
