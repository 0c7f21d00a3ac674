// TransferEngine between real processes over the tcp and shm providers: every byte checked against
// a per-(sender, receiver, offset) pattern, every immediate count exact.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "tests/common/multiprocess.h"
#include "transfer_engine/engine.h"

namespace ferry::te {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;
using testing::LaunchOptions;
using testing::run_ranks;

constexpr int kTimeoutMs = 20000;

uint8_t pattern(int sender, int receiver, uint64_t offset) {
  return static_cast<uint8_t>(sender * 131 + receiver * 29 + offset * 7 + (offset >> 9));
}

struct Case {
  std::string provider;
  int world_size;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.provider << " x" << c.world_size; }

std::string case_name(const ::testing::TestParamInfo<Case>& info) {
  return info.param.provider + "_" + std::to_string(info.param.world_size) + "ranks";
}

EngineConfig config_for(const std::string& provider) {
  EngineConfig config;
  config.provider = provider;
  config.timeout_ms = kTimeoutMs;
  return config;
}

// What every test rank sets up: a send region whose slot d holds pattern(me, d, .), a receive region
// with one slot per sender, and a group of every other rank's receive region.
struct Mesh {
  TransferEngine& engine;
  uint64_t slot_bytes;
  std::vector<uint8_t> send, recv;
  MemoryRegion* send_region = nullptr;
  MemoryRegion* recv_region = nullptr;
  std::vector<int> peers;
  PeerGroup* group = nullptr;

  Mesh(TransferEngine& e, uint64_t slot) : engine(e), slot_bytes(slot) {
    const int me = e.rank(), world = e.world_size();
    send.resize(slot * world);
    recv.assign(slot * world, 0xEE);
    for (int d = 0; d < world; ++d)
      for (uint64_t o = 0; o < slot; ++o) send[d * slot + o] = pattern(me, d, o);
    send_region = &e.register_memory(send.data(), send.size());
    recv_region = &e.register_memory(recv.data(), recv.size());
    std::vector<RegionDesc> all = e.exchange(*recv_region);
    std::vector<RegionDesc> remotes;
    for (int r = 0; r < world; ++r) {
      if (r == me) continue;
      peers.push_back(r);
      remotes.push_back(all[r]);
    }
    group = &e.make_group(peers, remotes);
  }

  // Slot `sender` of recv holds pattern(sender, me, .) for `bytes` bytes from `offset`.
  void expect_slot(int sender, uint64_t offset, uint64_t bytes) const {
    const int me = engine.rank();
    for (uint64_t o = offset; o < offset + bytes; ++o) {
      ASSERT_EQ(recv[sender * slot_bytes + o], pattern(sender, me, o))
          << "byte " << o << " from rank " << sender << " at rank " << me;
    }
  }

  // Every immediate consumed and nothing extra arrived: once all ranks have flushed and met at the
  // bootstrap barrier, no further arrival can be in flight.
  void expect_no_extra_arrivals(uint32_t tag) {
    engine.flush(kTimeoutMs);
    engine.bootstrap().barrier(kTimeoutMs);
    for (int p : peers) EXPECT_EQ(engine.imm_count(imm::encode(tag, p)), 0u) << "from rank " << p;
  }
};

class Transfer : public ::testing::TestWithParam<Case> {
 protected:
  LaunchOptions launch(std::map<std::string, std::string> env = {}) const {
    LaunchOptions options;
    options.world_size = GetParam().world_size;
    options.timeout_ms = 50000;
    options.env = std::move(env);
    // Our provider choice must win over a launcher's FI_PROVIDER.
    options.env["FI_PROVIDER"] = GetParam().provider == "tcp" ? "shm" : "tcp";
    return options;
  }
};

TEST_P(Transfer, SingleWritesDeliverEveryByteAndOneImmediatePerPiece) {
  const std::string provider = GetParam().provider;
  testing::expect_all_ok(run_ranks(launch(), [&](Bootstrap& b) {
    TransferEngine engine(config_for(provider), b);
    EXPECT_EQ(engine.provider(), provider == "tcp" ? "tcp;ofi_rxm" : "shm");
    Mesh mesh(engine, (256 << 10) + 13);
    const uint32_t tag = 100;
    const int me = engine.rank();
    for (size_t i = 0; i < mesh.peers.size(); ++i) {
      const int p = mesh.peers[i];
      engine.write(*mesh.group, i, *mesh.send_region, p * mesh.slot_bytes, me * mesh.slot_bytes,
                   mesh.slot_bytes, imm::encode(tag, me));
    }
    std::vector<ImmExpect> expects;
    for (int p : mesh.peers)
      expects.push_back({imm::encode(tag, p), engine.pieces_for(mesh.slot_bytes)});
    engine.wait(expects, kTimeoutMs);
    for (int p : mesh.peers) mesh.expect_slot(p, 0, mesh.slot_bytes);
    mesh.expect_no_extra_arrivals(tag);
    EXPECT_EQ(engine.stats().imms_received, mesh.peers.size());
  }));
}

TEST_P(Transfer, PagedWritesLandOnTheirPermutedPages) {
  const std::string provider = GetParam().provider;
  testing::expect_all_ok(run_ranks(launch(), [&](Bootstrap& b) {
    TransferEngine engine(config_for(provider), b);
    constexpr uint64_t kPage = 1000, kStride = 1024, kPages = 24;
    Mesh mesh(engine, kStride * kPages);
    const uint32_t tag = 101;
    const int me = engine.rank();
    for (size_t i = 0; i < mesh.peers.size(); ++i) {
      const int p = mesh.peers[i];
      // Source pages of slot p, sent to a rotated permutation of the pages of slot `me`.
      std::vector<uint32_t> src, dst;
      for (uint32_t k = 0; k < kPages; ++k) {
        src.push_back(p * kPages + k);
        dst.push_back(me * kPages + (k * 7 + me) % kPages);
      }
      engine.write_paged(*mesh.group, i, *mesh.send_region, kPage, kStride, kStride, src, dst,
                         imm::encode(tag, me));
    }
    std::vector<ImmExpect> expects;
    for (int p : mesh.peers) expects.push_back({imm::encode(tag, p), kPages});
    engine.wait(expects, kTimeoutMs);
    for (int p : mesh.peers) {
      for (uint64_t k = 0; k < kPages; ++k) {
        const uint64_t at = p * mesh.slot_bytes + ((k * 7 + p) % kPages) * kStride;
        for (uint64_t o = 0; o < kStride; ++o) {
          const uint8_t want = o < kPage ? pattern(p, me, k * kStride + o) : 0xEE;
          ASSERT_EQ(mesh.recv[at + o], want) << "page " << k << " byte " << o << " from " << p;
        }
      }
    }
    mesh.expect_no_extra_arrivals(tag);
  }));
}

TEST_P(Transfer, ScatterReachesEveryPeerIncludingImmediateOnlyEntries) {
  const std::string provider = GetParam().provider;
  testing::expect_all_ok(run_ranks(launch(), [&](Bootstrap& b) {
    TransferEngine engine(config_for(provider), b);
    Mesh mesh(engine, 64 << 10);
    const uint32_t tag = 102;
    const int me = engine.rank();
    // Per peer: a payload of a rank-dependent length at a rank-dependent offset, plus a zero-byte
    // entry that carries only the immediate.
    auto length_for = [&](int receiver) { return mesh.slot_bytes - 97 * receiver - 100; };
    std::vector<ScatterDst> dsts;
    for (size_t i = 0; i < mesh.peers.size(); ++i) {
      const int p = mesh.peers[i];
      dsts.push_back({static_cast<uint32_t>(i), p * mesh.slot_bytes + 5,
                      me * mesh.slot_bytes + 5, length_for(p)});
      dsts.push_back({static_cast<uint32_t>(i), 0, me * mesh.slot_bytes, 0});
    }
    engine.scatter(*mesh.group, *mesh.send_region, dsts, imm::encode(tag, me));
    std::vector<ImmExpect> expects;
    for (int p : mesh.peers) expects.push_back({imm::encode(tag, p), 2});
    engine.wait(expects, kTimeoutMs);
    for (int p : mesh.peers) {
      mesh.expect_slot(p, 5, length_for(me));
      EXPECT_EQ(mesh.recv[p * mesh.slot_bytes + 4], 0xEE) << "byte before the entry was written";
      EXPECT_EQ(mesh.recv[p * mesh.slot_bytes + 5 + length_for(me)], 0xEE)
          << "byte after the entry was written";
    }
    mesh.expect_no_extra_arrivals(tag);
  }));
}

TEST_P(Transfer, BarriersSeparateRoundsOfWrites) {
  const std::string provider = GetParam().provider;
  testing::expect_all_ok(run_ranks(launch(), [&](Bootstrap& b) {
    TransferEngine engine(config_for(provider), b);
    Mesh mesh(engine, 4096);
    const int me = engine.rank();
    for (uint32_t round = 0; round < 5; ++round) {
      // Rank r enters late in round r: the others must wait at the barrier for it.
      if (static_cast<uint32_t>(me) == round % engine.world_size()) usleep(100 * 1000);
      engine.barrier(*mesh.group, 200 + round, kTimeoutMs);
    }
    for (int p : mesh.peers) {
      for (uint32_t round = 0; round < 5; ++round)
        EXPECT_EQ(engine.imm_count(imm::encode(200 + round, p)), 0u);
    }
  }));
}

TEST_P(Transfer, FullTransmitQueueIsRetriedNotLost) {
  const std::string provider = GetParam().provider;
  // A tiny transmit queue forces -FI_EAGAIN on post.
  std::map<std::string, std::string> env = {
      {"FI_OFI_RXM_TX_SIZE", "8"}, {"FI_TCP_TX_SIZE", "8"}, {"FI_SHM_TX_SIZE", "8"}};
  testing::expect_all_ok(run_ranks(launch(env), [&](Bootstrap& b) {
    EngineConfig config = config_for(provider);
    config.max_posts_per_step = 256;
    TransferEngine engine(config, b);
    constexpr uint64_t kChunk = 512, kChunks = 600;
    Mesh mesh(engine, kChunk * kChunks);
    const uint32_t tag = 103;
    const int me = engine.rank();
    for (uint64_t c = 0; c < kChunks; ++c) {
      for (size_t i = 0; i < mesh.peers.size(); ++i) {
        const int p = mesh.peers[i];
        engine.write(*mesh.group, i, *mesh.send_region, p * mesh.slot_bytes + c * kChunk,
                     me * mesh.slot_bytes + c * kChunk, kChunk, imm::encode(tag, me));
      }
    }
    std::vector<ImmExpect> expects;
    for (int p : mesh.peers) expects.push_back({imm::encode(tag, p), kChunks});
    engine.wait(expects, kTimeoutMs);
    for (int p : mesh.peers) mesh.expect_slot(p, 0, mesh.slot_bytes);
    mesh.expect_no_extra_arrivals(tag);
    const EngineStats stats = engine.stats();
    std::printf("rank %d: %llu writes, %llu EAGAIN retries\n", me,
                static_cast<unsigned long long>(stats.writes_posted),
                static_cast<unsigned long long>(stats.eagain_retries));
    EXPECT_EQ(stats.writes_posted, kChunks * mesh.peers.size());
    // shm completes writes as it posts them (process_vm_writev), so only tcp;ofi_rxm's queue fills.
    if (provider == "tcp") {
      EXPECT_GT(stats.eagain_retries, 0u) << "the small queue never filled";
    }
  }));
}

TEST_P(Transfer, TwoNicsSplitByPeersAndByBytes) {
  const std::string provider = GetParam().provider;
  testing::expect_all_ok(run_ranks(launch(), [&](Bootstrap& b) {
    EngineConfig config = config_for(provider);
    config.nets_per_rank = 2;  // two endpoints on the same device: the multi-NIC paths, one wire
    config.min_split_bytes = 16 << 10;
    config.split_threshold_bytes = 64 << 10;
    TransferEngine engine(config, b);
    ASSERT_EQ(engine.num_nics(), 2);
    Mesh mesh(engine, 256 << 10);
    const int me = engine.rank();
    const uint64_t half = mesh.slot_bytes / 2;
    ASSERT_EQ(engine.pieces_for(half, NicRoute::by_bytes), 2u);
    ASSERT_EQ(engine.pieces_for(20 << 10, NicRoute::by_bytes), 1u);  // never below the minimum
    ASSERT_EQ(engine.pieces_for(half, NicRoute::automatic), 2u);
    ASSERT_EQ(engine.pieces_for(1000, NicRoute::automatic), 1u);
    for (size_t i = 0; i < mesh.peers.size(); ++i) {
      const int p = mesh.peers[i];
      // First half by bytes (two pieces), second half by peer, in 1000-byte writes.
      engine.write(*mesh.group, i, *mesh.send_region, p * mesh.slot_bytes, me * mesh.slot_bytes,
                   half, imm::encode(300, me), NicRoute::by_bytes);
      std::vector<ScatterDst> dsts;
      for (uint64_t o = half; o < mesh.slot_bytes; o += 1000) {
        const uint64_t bytes = std::min<uint64_t>(1000, mesh.slot_bytes - o);
        dsts.push_back({static_cast<uint32_t>(i), p * mesh.slot_bytes + o, me * mesh.slot_bytes + o,
                        bytes});
      }
      engine.scatter(*mesh.group, *mesh.send_region, dsts, imm::encode(301, me), NicRoute::by_peer);
    }
    const uint32_t small_writes = static_cast<uint32_t>((mesh.slot_bytes - half + 999) / 1000);
    std::vector<ImmExpect> expects;
    for (int p : mesh.peers) {
      expects.push_back({imm::encode(300, p), 2});
      expects.push_back({imm::encode(301, p), small_writes});
    }
    engine.wait(expects, kTimeoutMs);
    for (int p : mesh.peers) mesh.expect_slot(p, 0, mesh.slot_bytes);
    mesh.expect_no_extra_arrivals(300);
    mesh.expect_no_extra_arrivals(301);
  }));
}

// Several caller threads share one engine (the ring is multi-producer), and one scatter is larger
// than the ring, so records wrap around while the worker drains them.
TEST_P(Transfer, ConcurrentCallersAndScattersLargerThanTheRing) {
  const std::string provider = GetParam().provider;
  testing::expect_all_ok(run_ranks(launch(), [&](Bootstrap& b) {
    TransferEngine engine(config_for(provider), b);
    constexpr int kThreads = 4;
    constexpr uint64_t kEntry = 16, kEntries = 3000;  // per thread and peer
    constexpr uint64_t kPerThread = kEntry * kEntries;
    Mesh mesh(engine, kThreads * kPerThread);
    const int me = engine.rank();
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        std::vector<ScatterDst> dsts;
        for (size_t i = 0; i < mesh.peers.size(); ++i) {
          const uint64_t src = mesh.peers[i] * mesh.slot_bytes + t * kPerThread;
          const uint64_t dst = me * mesh.slot_bytes + t * kPerThread;
          for (uint64_t e = 0; e < kEntries; ++e)
            dsts.push_back({static_cast<uint32_t>(i), src + e * kEntry, dst + e * kEntry, kEntry});
        }
        engine.scatter(*mesh.group, *mesh.send_region, dsts, imm::encode(600 + t, me));
      });
    }
    for (auto& t : threads) t.join();
    std::vector<ImmExpect> expects;
    for (int p : mesh.peers)
      for (int t = 0; t < kThreads; ++t) expects.push_back({imm::encode(600 + t, p), kEntries});
    engine.wait(expects, kTimeoutMs);
    for (int p : mesh.peers) mesh.expect_slot(p, 0, mesh.slot_bytes);
    for (int t = 0; t < kThreads; ++t) mesh.expect_no_extra_arrivals(600 + t);
    EXPECT_EQ(engine.stats().writes_posted, kThreads * kEntries * mesh.peers.size());
    EXPECT_EQ(engine.stats().ops_posted, static_cast<uint64_t>(kThreads));
  }));
}

TEST_P(Transfer, SurvivorsOfAPeerThatExitsFailWithinTheDeadlineNamingIt) {
  const std::string provider = GetParam().provider;
  const int world = GetParam().world_size;
  const int dead = world - 1;
  auto results = run_ranks(launch(), [&](Bootstrap& b) {
    TransferEngine engine(config_for(provider), b);
    Mesh mesh(engine, 64 << 10);
    const int me = engine.rank();
    // Connections are up (a barrier went both ways, and every rank has seen it end) when the dead
    // rank leaves.
    engine.barrier(*mesh.group, 399, kTimeoutMs);
    engine.flush(kTimeoutMs);
    b.barrier(kTimeoutMs);
    if (me == dead) _exit(3);  // mid-operation: after setup, before sending anything
    // Everyone sends to everyone (including the dead rank) and waits for everyone.
    for (size_t i = 0; i < mesh.peers.size(); ++i) {
      const int p = mesh.peers[i];
      engine.write(*mesh.group, i, *mesh.send_region, p * mesh.slot_bytes, me * mesh.slot_bytes,
                   mesh.slot_bytes, imm::encode(400, me));
    }
    std::vector<ImmExpect> expects;
    for (int p : mesh.peers) expects.push_back({imm::encode(400, p), 1});
    const auto start = std::chrono::steady_clock::now();
    try {
      engine.wait(expects, 3000);
      ADD_FAILURE() << "wait succeeded although rank " << dead << " is gone";
    } catch (const Error& e) {
      const auto elapsed = std::chrono::steady_clock::now() - start;
      EXPECT_LT(elapsed, std::chrono::milliseconds(6000));
      EXPECT_THAT(e.status(), AnyOf(Status::timeout, Status::peer_failed, Status::transport));
      EXPECT_THAT(std::string(e.what()), HasSubstr("rank " + std::to_string(dead)));
      std::printf("rank %d saw: %s\n", me, e.what());
    }
    // The transport may report the dead peer's unfinished writes; either way flush must return or
    // fail within its deadline, not hang.
    try {
      engine.flush(1000);
    } catch (const Error& e) {
      std::printf("rank %d flush: %s\n", me, e.what());
    }
  });
  ASSERT_EQ(results.size(), static_cast<size_t>(world));
  for (const auto& r : results) {
    if (r.rank == dead) {
      EXPECT_EQ(r.exit_code, 3) << r.output;
    } else {
      EXPECT_EQ(r.exit_code, 0) << r.output;
      EXPECT_FALSE(r.timed_out) << r.output;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Providers, Transfer,
                         ::testing::Values(Case{"tcp", 2}, Case{"tcp", 4}, Case{"shm", 2},
                                           Case{"shm", 8}),
                         case_name);

}  // namespace
}  // namespace ferry::te
