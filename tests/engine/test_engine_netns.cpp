// Two hosts with two NICs each (network namespaces, veth pairs, one bridge per NIC plane): the
// engine's multi-NIC routes over real separate interfaces, every byte verified.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "tests/common/multiprocess.h"
#include "tests/common/netns.h"
#include "transfer_engine/engine.h"

namespace ferry::te {
namespace {

using testing::LaunchOptions;
using testing::NetnsCluster;
using testing::run_ranks;

constexpr int kHosts = 2;
constexpr int kNics = 2;
constexpr int kRanksPerHost = 2;
constexpr int kTimeoutMs = 20000;

uint8_t pattern(int sender, int receiver, uint64_t offset) {
  return static_cast<uint8_t>(sender * 37 + receiver * 101 + offset * 13 + (offset >> 11));
}

class TwoHostsTwoNics : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto availability = NetnsCluster::available();
    if (!availability.ok) GTEST_SKIP() << "network namespaces unavailable: " << availability.reason;
    cluster_ = std::make_unique<NetnsCluster>(kHosts, kNics);
  }

  LaunchOptions launch() const {
    LaunchOptions options;
    options.world_size = kHosts * kRanksPerHost;
    options.timeout_ms = 50000;
    options.env["MASTER_ADDR"] = cluster_->address(0, 0);
    const NetnsCluster* cluster = cluster_.get();
    options.rank_netns = [cluster](int rank) { return cluster->netns(rank / kRanksPerHost); };
    return options;
  }

  std::unique_ptr<NetnsCluster> cluster_;
};

// Every rank scatters a small and a large entry to every other rank: small ones by peer, large ones
// by bytes, so both NICs carry traffic across the two hosts.
TEST_F(TwoHostsTwoNics, ScatterSplitsByPeersAndByBytesAcrossBothNics) {
  testing::expect_all_ok(run_ranks(launch(), [](Bootstrap& b) {
    EngineConfig config;
    config.provider = "tcp";
    config.nets_per_rank = kNics;
    config.domains = {"fnic0", "fnic1"};
    config.min_split_bytes = 32 << 10;
    config.split_threshold_bytes = 128 << 10;
    config.timeout_ms = kTimeoutMs;
    TransferEngine engine(config, b);
    ASSERT_EQ(engine.nic_names(), (std::vector<std::string>{"fnic0", "fnic1"}));

    const int me = engine.rank(), world = engine.world_size();
    constexpr uint64_t kSmall = 3000, kLarge = 512 << 10, kSlot = kSmall + kLarge;
    std::vector<uint8_t> send(kSlot * world), recv(kSlot * world, 0xEE);
    for (int d = 0; d < world; ++d)
      for (uint64_t o = 0; o < kSlot; ++o) send[d * kSlot + o] = pattern(me, d, o);
    MemoryRegion& send_region = engine.register_memory(send.data(), send.size());
    MemoryRegion& recv_region = engine.register_memory(recv.data(), recv.size());
    const std::vector<RegionDesc> all = engine.exchange(recv_region);
    std::vector<int> peers;
    std::vector<RegionDesc> remotes;
    for (int r = 0; r < world; ++r) {
      if (r == me) continue;
      peers.push_back(r);
      remotes.push_back(all[r]);
    }
    PeerGroup& group = engine.make_group(peers, remotes);
    ASSERT_EQ(engine.pieces_for(kLarge), 2u);
    ASSERT_EQ(engine.pieces_for(kSmall), 1u);

    std::vector<ScatterDst> small, large;
    for (size_t i = 0; i < peers.size(); ++i) {
      const uint64_t src = peers[i] * kSlot, dst = me * kSlot;
      small.push_back({static_cast<uint32_t>(i), src, dst, kSmall});
      large.push_back({static_cast<uint32_t>(i), src + kSmall, dst + kSmall, kLarge});
    }
    engine.scatter(group, send_region, small, imm::encode(500, me), NicRoute::by_peer);
    engine.scatter(group, send_region, large, imm::encode(501, me), NicRoute::automatic);
    std::vector<ImmExpect> expects;
    for (int p : peers) {
      expects.push_back({imm::encode(500, p), 1});
      expects.push_back({imm::encode(501, p), engine.pieces_for(kLarge)});
    }
    engine.wait(expects, kTimeoutMs);
    for (int p : peers) {
      for (uint64_t o = 0; o < kSlot; ++o) {
        ASSERT_EQ(recv[p * kSlot + o], pattern(p, me, o)) << "byte " << o << " from rank " << p;
      }
    }
    engine.flush(kTimeoutMs);
    const EngineStats stats = engine.stats();
    // by_bytes halves every large write; by_peer puts peer i on NIC i % 2.
    EXPECT_GE(stats.bytes_posted_per_nic[0], peers.size() * kLarge / 2);
    EXPECT_GE(stats.bytes_posted_per_nic[1], peers.size() * kLarge / 2);
    engine.bootstrap().barrier(kTimeoutMs);
    for (int p : peers) {
      EXPECT_EQ(engine.imm_count(imm::encode(500, p)), 0u);
      EXPECT_EQ(engine.imm_count(imm::encode(501, p)), 0u);
    }
  }));
}

}  // namespace
}  // namespace ferry::te
