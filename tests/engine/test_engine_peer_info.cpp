// What peers send the engine through the bootstrap (endpoint addresses at setup, region
// descriptors later) is checked field by field before use: on its own, and between real processes
// where one rank lies.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstddef>
#include <cstring>
#include <functional>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "tests/common/error_of.h"
#include "tests/common/multiprocess.h"
#include "transfer_engine/engine.h"
#include "transfer_engine/peer_info.h"

namespace ferry::te {
namespace {

using testing::error_of;

using ::testing::AllOf;
using ::testing::HasSubstr;

peer_info::LocalSetup two_nic_setup() {
  peer_info::LocalSetup setup;
  setup.provider = "tcp;ofi_rxm";
  setup.virt_addr = false;
  setup.addresses = {std::vector<uint8_t>(16, 0xa1), std::vector<uint8_t>(28, 0xb2)};
  return setup;
}

// The allgather result of `world` ranks that all sent `blob`, with rank `liar`'s replaced.
std::vector<uint8_t> gathered(const std::vector<uint8_t>& blob, int world, int liar,
                              const std::vector<uint8_t>& lie) {
  std::vector<uint8_t> all;
  for (int r = 0; r < world; ++r) {
    const auto& b = r == liar ? lie : blob;
    all.insert(all.end(), b.begin(), b.end());
  }
  return all;
}

void set_address_length(std::vector<uint8_t>& blob, size_t nic, uint32_t length) {
  std::memcpy(blob.data() + sizeof(peer_info::SetupHeader) + nic * peer_info::kAddressSlotBytes,
              &length, sizeof(length));
}

TEST(SetupBlob, EveryRanksAddressesComeBackPerNicAndRank) {
  const auto mine = two_nic_setup();
  const auto blob = peer_info::encode_setup(mine, 0);
  ASSERT_EQ(blob.size(), peer_info::kSetupBlobBytes);
  const auto addresses = peer_info::parse_setups(gathered(blob, 3, -1, {}), 3, mine, 0);
  ASSERT_EQ(addresses.size(), 2u);
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(addresses[0][r], mine.addresses[0]);
    EXPECT_EQ(addresses[1][r], mine.addresses[1]);
  }
}

TEST(SetupBlob, AnAddressLengthBeyondItsSlotIsRejectedNamingRankAndNic) {
  const auto mine = two_nic_setup();
  const auto blob = peer_info::encode_setup(mine, 0);
  for (uint32_t length : {100000u, uint32_t(peer_info::kAddressSlotBytes), 0xffffffffu, 0u}) {
    auto lie = blob;
    set_address_length(lie, 1, length);
    auto error = error_of([&] { peer_info::parse_setups(gathered(blob, 4, 2, lie), 4, mine, 0); });
    ASSERT_TRUE(error) << "length " << length;
    EXPECT_EQ(error->status(), Status::invalid_argument);
    EXPECT_THAT(error->what(), AllOf(HasSubstr("rank 2's setup gives NIC 1 an endpoint address of " +
                                               std::to_string(length) + " bytes"),
                                     HasSubstr("1 to 252")));
  }
}

TEST(SetupBlob, AProviderNameThatIsNotTerminatedIsRejectedNotPrinted) {
  const auto mine = two_nic_setup();
  const auto blob = peer_info::encode_setup(mine, 0);
  auto lie = blob;
  std::memset(lie.data() + offsetof(peer_info::SetupHeader, provider), 'x',
              peer_info::kProviderNameBytes);
  auto error = error_of([&] { peer_info::parse_setups(gathered(blob, 2, 1, lie), 2, mine, 0); });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("rank 1's setup names a provider that is not terminated"));
}

TEST(SetupBlob, ADifferentProviderNicCountOrAddressingModeNamesTheRank) {
  const auto mine = two_nic_setup();
  const auto blob = peer_info::encode_setup(mine, 0);
  auto other = mine;
  other.provider = "shm";
  auto error = error_of([&] {
    peer_info::parse_setups(gathered(blob, 3, 1, peer_info::encode_setup(other, 1)), 3, mine, 0);
  });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("rank 1 opened 2 NICs of provider shm, this rank 2 of tcp;ofi_rxm"));
  auto lie = blob;
  const uint32_t nics = 200;
  std::memcpy(lie.data(), &nics, sizeof(nics));
  error = error_of([&] { peer_info::parse_setups(gathered(blob, 3, 2, lie), 3, mine, 0); });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("rank 2 opened 200 NICs"));
  lie = blob;
  const uint32_t mode = 7;
  std::memcpy(lie.data() + 4, &mode, sizeof(mode));
  error = error_of([&] { peer_info::parse_setups(gathered(blob, 3, 2, lie), 3, mine, 0); });
  ASSERT_TRUE(error);
  EXPECT_THAT(error->what(), HasSubstr("addressing mode 7"));
}

TEST(SetupBlob, WhatThisRankCannotCarryIsRefusedBeforeItIsSent) {
  auto mine = two_nic_setup();
  mine.addresses[0].resize(peer_info::kMaxAddressBytes + 1);
  EXPECT_THROW(peer_info::encode_setup(mine, 0), Error);
  mine = two_nic_setup();
  mine.provider = std::string(peer_info::kProviderNameBytes, 'p');
  EXPECT_THROW(peer_info::encode_setup(mine, 0), Error);
}

RegionDesc desc_of(uint32_t owner, uint32_t nics, uint64_t addr, uint64_t bytes) {
  RegionDesc d;
  d.owner_rank = owner;
  d.num_nics = nics;
  d.addr = addr;
  d.bytes = bytes;
  return d;
}

TEST(RegionDescs, EachMustComeFromItsRankWithOneKeyPerNicAndAnAddressThatFits) {
  std::vector<RegionDesc> descs = {desc_of(0, 2, 0, 64), desc_of(1, 2, 0, 64), desc_of(2, 2, 0, 64)};
  EXPECT_NO_THROW(peer_info::check_region_descs(descs, 2, false, 0));
  struct Lie {
    RegionDesc desc;
    bool virt_addr;
    std::string says;
  };
  const std::vector<Lie> lies = {
      {desc_of(0, 2, 0, 64), false, "the region descriptor of rank 1 is rank 0's"},
      {desc_of(1, 9, 0, 64), false, "rank 1 has 9 NIC keys, this engine has 2 NICs"},
      {desc_of(1, 2, 0, 0), false, "rank 1 is empty"},
      {desc_of(1, 2, 4096, 64), false, "rank 1 has base address 4096"},
      {desc_of(1, 2, ~uint64_t{0} - 10, 64), true, "rank 1 wraps around the address space"},
  };
  for (const Lie& lie : lies) {
    descs[1] = lie.desc;
    if (lie.virt_addr) descs[0].addr = descs[2].addr = 4096;
    auto error = error_of([&] { peer_info::check_region_descs(descs, 2, lie.virt_addr, 0); });
    ASSERT_TRUE(error) << lie.says;
    EXPECT_THAT(error->what(), HasSubstr(lie.says));
  }
}

// ---- between real processes: one rank lies about itself ----------------------------------------

// A rank whose bootstrap rewrites its own contribution to every allgather of `bytes` bytes: what a
// broken or hostile peer could put on the wire.
class LyingBootstrap final : public Bootstrap {
 public:
  LyingBootstrap(Bootstrap& inner, size_t bytes, std::function<void(uint8_t*)> lie)
      : inner_(inner), bytes_(bytes), lie_(std::move(lie)) {}
  int rank() const override { return inner_.rank(); }
  int world_size() const override { return inner_.world_size(); }
  int local_rank() const override { return inner_.local_rank(); }
  int local_size() const override { return inner_.local_size(); }
  void allgather(const void* in, size_t bytes, void* out, int timeout_ms) override {
    if (bytes != bytes_) return inner_.allgather(in, bytes, out, timeout_ms);
    std::vector<uint8_t> lied(static_cast<const uint8_t*>(in), static_cast<const uint8_t*>(in) + bytes);
    lie_(lied.data());
    inner_.allgather(lied.data(), bytes, out, timeout_ms);
  }

 private:
  Bootstrap& inner_;
  size_t bytes_;
  std::function<void(uint8_t*)> lie_;
};

EngineConfig tcp_config() {
  EngineConfig config;
  config.provider = "tcp";
  config.timeout_ms = 20000;
  return config;
}

TEST(LyingPeer, ASetupBlobWithAnAddressLengthOf100000FailsEverySetupNamingThatRank) {
  testing::LaunchOptions options;
  options.world_size = 3;
  testing::expect_all_ok(testing::run_ranks(options, [](Bootstrap& b) {
    LyingBootstrap liar(b, peer_info::kSetupBlobBytes, [&b](uint8_t* blob) {
      if (b.rank() == 1) {
        const uint32_t length = 100000;
        std::memcpy(blob + sizeof(peer_info::SetupHeader), &length, sizeof(length));
      }
    });
    auto error = error_of([&] { TransferEngine engine(tcp_config(), liar); });
    ASSERT_TRUE(error) << "rank " << b.rank() << " accepted the blob";
    EXPECT_EQ(error->status(), Status::invalid_argument);
    EXPECT_THAT(error->what(),
                HasSubstr("rank 1's setup gives NIC 0 an endpoint address of 100000 bytes"));
  }));
}

TEST(LyingPeer, ARegionDescriptorClaimingAnotherOwnerFailsTheExchangeEverywhere) {
  testing::LaunchOptions options;
  options.world_size = 2;
  testing::expect_all_ok(testing::run_ranks(options, [](Bootstrap& b) {
    LyingBootstrap liar(b, sizeof(RegionDesc), [&b](uint8_t* desc) {
      if (b.rank() == 1) {
        const uint32_t owner = 0;
        std::memcpy(desc + offsetof(RegionDesc, owner_rank), &owner, sizeof(owner));
      }
    });
    TransferEngine engine(tcp_config(), liar);
    std::vector<uint8_t> buffer(4096);
    MemoryRegion& region = engine.register_memory(buffer.data(), buffer.size());
    auto error = error_of([&] { engine.exchange(region); });
    ASSERT_TRUE(error) << "rank " << b.rank() << " accepted the descriptor";
    EXPECT_THAT(error->what(), HasSubstr("the region descriptor of rank 1 is rank 0's"));
  }));
}

// ---- memory keys ---------------------------------------------------------------------------------

class EngineKeys : public ::testing::TestWithParam<std::string> {};

// tcp and shm take the key Ferry requests: a key counted up from 1 lets anyone who reaches the NIC
// guess every region's key; random keys name nothing beyond their own region.
TEST_P(EngineKeys, RequestedKeysAreRandomAndUniqueWithinAnEngine) {
  testing::LaunchOptions options;
  options.world_size = 1;
  const std::string provider = GetParam();
  testing::expect_all_ok(testing::run_ranks(options, [&provider](Bootstrap& b) {
    EngineConfig config = tcp_config();
    config.provider = provider;
    TransferEngine engine(config, b);
    std::vector<std::vector<uint8_t>> buffers(64, std::vector<uint8_t>(256));
    std::set<uint64_t> keys;
    std::vector<uint64_t> in_order;
    for (auto& buffer : buffers) {
      const uint64_t key = engine.register_memory(buffer.data(), buffer.size()).desc().keys[0];
      keys.insert(key);
      in_order.push_back(key);
    }
    EXPECT_EQ(keys.size(), buffers.size()) << "two regions share a key";
    EXPECT_GT(*keys.rbegin(), uint64_t{1} << 32) << "64 keys all below 2^32 are not random";
    std::set<uint64_t> steps;
    for (size_t i = 1; i < in_order.size(); ++i) steps.insert(in_order[i] - in_order[i - 1]);
    EXPECT_GT(steps.size(), 1u) << "keys follow a fixed stride";
  }));
}

INSTANTIATE_TEST_SUITE_P(Providers, EngineKeys, ::testing::Values("tcp", "shm"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace ferry::te
