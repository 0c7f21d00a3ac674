// TransferEngine pieces that need no peer: immediates, NIC splitting, imm counters, and the bounds
// checks and loopback writes of a one-rank engine.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <numeric>
#include <thread>
#include <unistd.h>
#include <vector>

#include "transfer_engine/engine.h"
#include "transfer_engine/fabric/shm_names.h"
#include "transfer_engine/imm_counter.h"
#include "transfer_engine/route.h"

#ifdef FERRY_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace ferry::te {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

TEST(Imm, EncodesTagAndSenderInThirtyTwoBits) {
  const uint32_t value = imm::encode(123456, 4095);
  EXPECT_EQ(imm::tag(value), 123456u);
  EXPECT_EQ(imm::sender(value), 4095u);
  EXPECT_EQ(imm::tag(imm::encode(imm::kMaxTag, 0)), imm::kMaxTag);
  EXPECT_EQ(imm::sender(imm::encode(7, 4096 + 3)), 3u);  // rank bits never spill into the tag
  EXPECT_EQ(imm::tag(imm::encode(7, 4096 + 3)), 7u);
}

// shm regions are named after the endpoint; a pid alone collides with what a killed process left.
TEST(ShmNames, CarryThePidAndDifferEveryTime) {
  const std::string prefix = std::string(ferry::te::fabric::kShmNamePrefix) + std::to_string(getpid()) + "-";
  const std::string a = ferry::te::fabric::shm_endpoint_name(0);
  const std::string b = ferry::te::fabric::shm_endpoint_name(0);
  EXPECT_EQ(a.rfind(prefix, 0), 0u) << a;
  EXPECT_NE(a, b);
}

TEST(ShmNames, RegionsOfAnExitedProcessAreRemovedAndOthersKept) {
  const int dead_pid = 999999;  // above pid_max: no live process has it
  const std::string mine = std::string("/dev/shm/") + ferry::te::fabric::kShmNamePrefix +
                           std::to_string(dead_pid) + "-0123456789abcdef-0";
  const std::string other = std::string("/dev/shm/") + ferry::te::fabric::kShmNamePrefix +
                            std::to_string(dead_pid) + "0-0123456789abcdef-0";
  for (const auto& path : {mine, other}) {
    FILE* f = std::fopen(path.c_str(), "w");
    ASSERT_NE(f, nullptr) << path;
    std::fclose(f);
  }
  ferry::te::fabric::remove_shm_regions_of(dead_pid);
  EXPECT_FALSE(std::filesystem::exists(mine));
  EXPECT_TRUE(std::filesystem::exists(other)) << "a pid sharing a prefix must be left alone";
  std::filesystem::remove(other);
}

TEST(Route, AutomaticSplitsBytesOnlyAtTheThresholdAndWithSeveralNics) {
  EXPECT_EQ(route::resolve(NicRoute::automatic, 1 << 20, 2, 1 << 20), NicRoute::by_bytes);
  EXPECT_EQ(route::resolve(NicRoute::automatic, (1 << 20) - 1, 2, 1 << 20), NicRoute::by_peer);
  EXPECT_EQ(route::resolve(NicRoute::by_bytes, 1 << 30, 1, 1 << 20), NicRoute::by_peer);
}

TEST(Route, PiecesAreOnePerNicButNeverBelowTheMinimum) {
  const uint64_t min = 64 << 10;
  EXPECT_EQ(route::piece_count(NicRoute::by_bytes, 0, 4, min), 1u);
  EXPECT_EQ(route::piece_count(NicRoute::by_bytes, min - 1, 4, min), 1u);
  EXPECT_EQ(route::piece_count(NicRoute::by_bytes, 2 * min, 4, min), 2u);
  EXPECT_EQ(route::piece_count(NicRoute::by_bytes, 3 * min + 5, 4, min), 3u);
  EXPECT_EQ(route::piece_count(NicRoute::by_bytes, 100 * min, 4, min), 4u);
  EXPECT_EQ(route::piece_count(NicRoute::by_peer, 100 * min, 4, min), 1u);
}

TEST(Route, PiecesTileTheWriteExactlyAndUseDistinctNics) {
  for (uint64_t bytes : {uint64_t{1}, uint64_t{1000003}, uint64_t{1} << 33}) {
    for (uint32_t count = 1; count <= 4; ++count) {
      uint64_t next = 0;
      std::vector<int> nics;
      for (uint32_t i = 0; i < count; ++i) {
        const route::Piece p = route::piece(bytes, i, count, 5, 4, NicRoute::by_bytes);
        EXPECT_EQ(p.offset, next);
        next += p.bytes;
        nics.push_back(p.nic);
      }
      EXPECT_EQ(next, bytes);
      std::sort(nics.begin(), nics.end());
      EXPECT_EQ(std::unique(nics.begin(), nics.end()), nics.end());
    }
  }
  // by_peer: peer index modulo NIC count.
  EXPECT_EQ(route::piece(100, 0, 1, 6, 4, NicRoute::by_peer).nic, 2);
}

TEST(ImmCounter, CountsConcurrentArrivalsExactly) {
  ImmCounter counter(1 << 12);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        ASSERT_TRUE(counter.add(imm::encode(100 + i % 50, t)));
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int t = 0; t < kThreads; ++t) {
    for (int tag = 100; tag < 150; ++tag) {
      EXPECT_EQ(counter.count(imm::encode(tag, t)), kPerThread / 50u);
    }
  }
  EXPECT_EQ(counter.count(imm::encode(99, 0)), 0u);
}

TEST(ImmCounter, ConcurrentConsumersNeverTakeMoreThanArrived) {
  ImmCounter counter;
  const uint32_t value = imm::encode(20, 1);
  std::atomic<uint32_t> consumed{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> consumers;
  for (int t = 0; t < 3; ++t) {
    consumers.emplace_back([&] {
      while (!done.load() || counter.count(value) > 0) {
        if (counter.try_consume(value, 1)) consumed.fetch_add(1);
      }
    });
  }
  for (int i = 0; i < 30000; ++i) counter.add(value);
  done.store(true);
  for (auto& t : consumers) t.join();
  EXPECT_EQ(consumed.load(), 30000u);
  EXPECT_EQ(counter.count(value), 0u);
}

TEST(ImmCounter, WaitConsumesExactlyTheExpectedCounts) {
  ImmCounter counter;
  const uint32_t a = imm::encode(30, 2), b = imm::encode(31, 3);
  for (int i = 0; i < 5; ++i) counter.add(a);
  counter.add(b);
  const ImmExpect expects[] = {{a, 3}, {b, 1}};
  wait_for_imms(counter, expects, 1000, "test", nullptr);
  EXPECT_EQ(counter.count(a), 2u);
  EXPECT_EQ(counter.count(b), 0u);
}

TEST(ImmCounter, WaitNeedsEveryExpectationAndConsumesNothingUntilThen) {
  ImmCounter counter;
  const uint32_t a = imm::encode(40, 0), b = imm::encode(40, 1);
  counter.add(a);
  const ImmExpect expects[] = {{a, 1}, {b, 1}};
  EXPECT_FALSE(counter.try_consume_all(expects));
  EXPECT_EQ(counter.count(a), 1u);
  std::thread late([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    counter.add(b);
  });
  wait_for_imms(counter, expects, 5000, "test", nullptr);
  late.join();
  EXPECT_EQ(counter.count(a), 0u);
  EXPECT_EQ(counter.count(b), 0u);
}

TEST(ImmCounter, TimeoutNamesEveryMissingSenderAndHowManyArrivalsAreMissing) {
  ImmCounter counter;
  counter.add(imm::encode(50, 1));
  counter.add(imm::encode(50, 3));
  counter.add(imm::encode(50, 3));
  const ImmExpect expects[] = {
      {imm::encode(50, 1), 1}, {imm::encode(50, 3), 5}, {imm::encode(50, 6), 2}};
  try {
    wait_for_imms(counter, expects, 100, "rank 0 wait", nullptr);
    FAIL() << "wait returned without its arrivals";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::timeout);
    const std::string what = e.what();
    EXPECT_THAT(what, HasSubstr("rank 0 wait"));
    EXPECT_THAT(what, HasSubstr("from rank 3): 3 of 5 missing"));
    EXPECT_THAT(what, HasSubstr("from rank 6): 2 of 2 missing"));
    EXPECT_THAT(what, ::testing::Not(HasSubstr("from rank 1)")));
  }
  // A timed-out wait consumed nothing.
  EXPECT_EQ(counter.count(imm::encode(50, 3)), 2u);
}

// A sleeping waiter is woken when its immediate reaches its count, not by other arrivals, and no
// arrival between its last look and its sleep is slept through (each sleep here would otherwise
// last its 20 s timeout).
TEST(ImmCounter, ASleeperWakesWhenItsImmediateReachesItsCountAndNotBefore) {
  ImmCounter counter;
  const uint32_t mine = imm::encode(60, 1), other = imm::encode(60, 2);
  std::atomic<bool> woke{false};
  const auto start = std::chrono::steady_clock::now();
  std::thread sleeper([&] {
    const uint32_t seen = counter.arrival_epoch();
    counter.sleep_until_arrival(seen, 20'000'000, mine, 2);
    woke = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  counter.add(other, 5);
  counter.add(mine);
  counter.notify_arrivals();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_FALSE(woke.load()) << "woken by arrivals short of its count";
  counter.add(mine);
  sleeper.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(ImmCounter, WakeAllWakesEverySleeper) {
  ImmCounter counter;
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> sleepers;
  for (uint32_t i = 0; i < 20; ++i)  // more than there are watch slots
    sleepers.emplace_back([&, i] { counter.sleep_until_arrival(counter.arrival_epoch(), 20'000'000, imm::encode(61, i), 1); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  counter.wake_all();
  for (auto& t : sleepers) t.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
}

TEST(ImmCounter, NoArrivalIsSleptThroughUnderRacingProducers) {
  ImmCounter counter;
  constexpr int kRounds = 3000;
  const uint32_t a = imm::encode(62, 0), b = imm::encode(62, 1);
  const auto start = std::chrono::steady_clock::now();
  std::thread producer([&] {
    for (int i = 0; i < kRounds; ++i) {
      counter.add(i % 2 ? a : b);
      counter.add(i % 2 ? b : a);
      counter.notify_arrivals();
      if (i % 7 == 0) std::this_thread::yield();
    }
  });
  const ImmExpect expects[] = {{a, 1}, {b, 1}};
  for (int i = 0; i < kRounds; ++i) {
    for (;;) {
      const uint32_t seen = counter.arrival_epoch();
      if (counter.try_consume_all(expects)) break;
      for (const ImmExpect& e : expects)
        if (counter.count(e.imm) < e.count) {
          counter.sleep_until_arrival(seen, 20'000'000, e.imm, e.count);
          break;
        }
    }
  }
  producer.join();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(15));
}

TEST(ImmCounter, ReportsAFullTableInsteadOfLosingArrivals) {
  ImmCounter counter(16);
  for (uint32_t i = 0; i < 16; ++i) EXPECT_TRUE(counter.add(i));
  EXPECT_FALSE(counter.add(1000));
  EXPECT_TRUE(counter.add(3));
  EXPECT_EQ(counter.count(3), 2u);
}

// --- one-rank engine: writes to itself through the provider ------------------------------------

std::unique_ptr<Bootstrap> solo_bootstrap() {
  BootstrapCallbacks callbacks;
  callbacks.allgather = [](void*, const void* in, size_t bytes, void* out) {
    std::memcpy(out, in, bytes);
    return 0;
  };
  callbacks.rank = 0;
  callbacks.world_size = 1;
  callbacks.local_rank = 0;
  callbacks.local_size = 1;
  return make_callback_bootstrap(callbacks);
}

class SoloEngine : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    bootstrap_ = solo_bootstrap();
    EngineConfig config;
    config.provider = GetParam();
    config.timeout_ms = 10000;
    engine_ = std::make_unique<TransferEngine>(config, *bootstrap_);
    src_.resize(4096);
    dst_.resize(1024);
    std::iota(src_.begin(), src_.end(), 0);
    src_region_ = &engine_->register_memory(src_.data(), src_.size());
    dst_region_ = &engine_->register_memory(dst_.data(), dst_.size());
    const int self = 0;
    const RegionDesc remote = dst_region_->desc();
    group_ = &engine_->make_group(std::span<const int>(&self, 1),
                                  std::span<const RegionDesc>(&remote, 1));
  }

  std::unique_ptr<Bootstrap> bootstrap_;
  std::unique_ptr<TransferEngine> engine_;
  std::vector<uint8_t> src_, dst_;
  MemoryRegion* src_region_ = nullptr;
  MemoryRegion* dst_region_ = nullptr;
  PeerGroup* group_ = nullptr;
};

TEST_P(SoloEngine, RejectsAWriteBeyondTheLocalRegionNamingRegionOffsetsAndPeer) {
  try {
    engine_->write(*group_, 0, *src_region_, 4000, 0, 200, imm::encode(20, 0));
    FAIL() << "out-of-bounds source accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument);
    EXPECT_THAT(std::string(e.what()),
                AllOf(HasSubstr("source [4000, 4000 + 200)"), HasSubstr("4096 bytes"),
                      HasSubstr("rank 0")));
  }
}

TEST_P(SoloEngine, RejectsAWriteBeyondThePeersRegionNamingThePeer) {
  try {
    engine_->write(*group_, 0, *src_region_, 0, 1000, 25, imm::encode(20, 0));
    FAIL() << "out-of-bounds destination accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument);
    EXPECT_THAT(std::string(e.what()),
                AllOf(HasSubstr("destination [1000, 1000 + 25)"),
                      HasSubstr("outside rank 0's region of 1024 bytes")));
  }
  const ScatterDst overflow[] = {{0, 0, 0, 1024}, {0, 0, 1, 1024}};
  EXPECT_THROW(engine_->scatter(*group_, *src_region_, overflow, imm::encode(20, 0)), Error);
  // Nothing of the rejected scatter was queued, not even its valid first entry.
  engine_->flush();
  EXPECT_EQ(engine_->stats().writes_posted, 0u);
}

TEST_P(SoloEngine, WritesToItselfAndCountsTheImmediate) {
  const uint32_t value = imm::encode(21, 0);
  engine_->write(*group_, 0, *src_region_, 100, 10, 900, value);
  engine_->wait(value, 1, 5000);
  engine_->flush();
  for (size_t i = 0; i < 900; ++i) ASSERT_EQ(dst_[10 + i], src_[100 + i]) << "offset " << i;
  EXPECT_EQ(engine_->imm_count(value), 0u);
  EXPECT_EQ(engine_->stats().imms_received, 1u);
}

TEST_P(SoloEngine, ZeroByteWriteDeliversItsImmediate) {
  const uint32_t value = imm::encode(22, 0);
  engine_->write(*group_, 0, *src_region_, 0, 0, 0, value);
  engine_->wait(value, 1, 5000);
  engine_->barrier(*group_, 23, 5000);
}

TEST_P(SoloEngine, SetsAFlagAndCallsBackWhenTheCountIsReached) {
  const uint32_t value = imm::encode(24, 0);
  volatile uint32_t flag = 0;
  std::atomic<int> calls{0};
  engine_->set_flag_on_imm(value, 2, &flag, 7);
  engine_->write(*group_, 0, *src_region_, 0, 0, 8, value);
  engine_->write(*group_, 0, *src_region_, 0, 0, 8, value);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (__atomic_load_n(&flag, __ATOMIC_ACQUIRE) != 7 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::yield();
  EXPECT_EQ(flag, 7u);
  EXPECT_EQ(engine_->imm_count(value), 0u);  // the flag consumed both arrivals

  engine_->on_imm(value, 1, [&] { calls.fetch_add(1); });
  engine_->write(*group_, 0, *src_region_, 0, 0, 8, value);
  while (calls.load() == 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
  EXPECT_EQ(calls.load(), 1);
}

TEST_P(SoloEngine, CudaMemoryOnAHostOnlyProviderIsClearlyUnsupported) {
  if (GetParam() != "tcp") GTEST_SKIP() << "only tcp is host-only (shm reports FI_HMEM)";
  try {
    engine_->register_memory(src_.data(), src_.size(), MemoryKind::cuda, 0);
    FAIL() << "CUDA registration accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::unsupported);
    EXPECT_THAT(std::string(e.what()), HasSubstr("CUDA"));
  }
}

#ifdef FERRY_HAVE_CUDA
// GPU memory through fi_mr_regattr (FI_HMEM_CUDA, dmabuf where libfabric has it): a device buffer
// is written from host memory and read back into host memory through the provider.
TEST_P(SoloEngine, CudaMemoryRegistersAndMovesBytesWhereTheProviderReportsHmem) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
    GTEST_SKIP() << "no CUDA device on this machine";
  constexpr size_t kBytes = 1 << 20;
  void* device = nullptr;
  ASSERT_EQ(cudaMalloc(&device, kBytes), cudaSuccess);
  ASSERT_EQ(cudaMemset(device, 0, kBytes), cudaSuccess);
  MemoryRegion* gpu = nullptr;
  try {
    gpu = &engine_->register_memory(device, kBytes, MemoryKind::cuda, 0);
  } catch (const Error& e) {
    cudaFree(device);
    if (e.status() == Status::unsupported) GTEST_SKIP() << e.what();
    FAIL() << e.what();
  }
  std::vector<uint8_t> host(kBytes);
  for (size_t i = 0; i < kBytes; ++i) host[i] = static_cast<uint8_t>(i * 11 + 3);
  MemoryRegion& host_region = engine_->register_memory(host.data(), host.size());
  const int self = 0;
  const RegionDesc to_gpu = gpu->desc();
  PeerGroup& gpu_group =
      engine_->make_group(std::span<const int>(&self, 1), std::span<const RegionDesc>(&to_gpu, 1));
  engine_->write(gpu_group, 0, host_region, 0, 0, kBytes, imm::encode(26, 0));
  engine_->wait(imm::encode(26, 0), 1, 10000);
  std::vector<uint8_t> back(kBytes);
  ASSERT_EQ(cudaMemcpy(back.data(), device, kBytes, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(back, host);
  // And from the GPU region into host memory.
  engine_->write(*group_, 0, *gpu, 0, 0, dst_.size(), imm::encode(27, 0));
  engine_->wait(imm::encode(27, 0), 1, 10000);
  EXPECT_TRUE(std::equal(dst_.begin(), dst_.end(), host.begin()));
  engine_->flush();
  engine_->deregister(*gpu);
  cudaFree(device);
}
#endif

// tcp and shm drop a write whose key the target does not know without telling the initiator; the
// wait must still end at its deadline, naming the sender and the write that never completed.
TEST_P(SoloEngine, AWriteWithAnUnknownKeyNeverCountsAndTheWaitSaysWhatIsMissing) {
  RegionDesc forged = dst_region_->desc();
  forged.keys[0] += 977;  // no region has this key
  const int self = 0;
  PeerGroup& bad =
      engine_->make_group(std::span<const int>(&self, 1), std::span<const RegionDesc>(&forged, 1));
  const uint32_t value = imm::encode(28, 0);
  engine_->write(bad, 0, *src_region_, 0, 0, 64, value);
  const auto start = std::chrono::steady_clock::now();
  try {
    engine_->wait(value, 1, 1000);
    FAIL() << "a write with an unknown key was delivered";
  } catch (const Error& e) {
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(3));
    EXPECT_THAT(std::string(e.what()), HasSubstr("from rank 0): 1 of 1 missing"));
  }
  EXPECT_EQ(engine_->imm_count(value), 0u);
}

TEST_P(SoloEngine, WaitTimesOutNamingTheSender) {
  try {
    engine_->wait(imm::encode(25, 0), 1, 50);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::timeout);
    EXPECT_THAT(std::string(e.what()), HasSubstr("from rank 0): 1 of 1 missing"));
  }
}

TEST(EngineConfig, EnvironmentOverridesProviderAndDomains) {
  auto bootstrap = solo_bootstrap();
  EngineConfig config;
  config.provider = "shm";
  config.timeout_ms = 10000;
  setenv("FERRY_PROVIDER", "tcp", 1);
  setenv("FERRY_DOMAINS", "lo,lo", 1);
  try {
    TransferEngine engine(config, *bootstrap);
    EXPECT_EQ(engine.provider(), "tcp;ofi_rxm");
    EXPECT_EQ(engine.nic_names(), (std::vector<std::string>{"lo", "lo"}));
  } catch (const Error& e) {
    ADD_FAILURE() << e.what();
  }
  unsetenv("FERRY_PROVIDER");
  unsetenv("FERRY_DOMAINS");
}

TEST(EngineConfig, RejectsSettingsItCannotHonourWithActionableMessages) {
  auto bootstrap = solo_bootstrap();
  EngineConfig config;
  config.nets_per_rank = kMaxNics + 1;
  try {
    TransferEngine engine(config, *bootstrap);
    FAIL() << "nets_per_rank beyond kMaxNics accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument);
    EXPECT_THAT(std::string(e.what()), HasSubstr("nets_per_rank 9 must be in [1, 8]"));
  }
  config = EngineConfig{};
  config.domains = {"no-such-interface"};
  try {
    TransferEngine engine(config, *bootstrap);
    FAIL() << "an unknown domain was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::unsupported);
    EXPECT_THAT(std::string(e.what()), AllOf(HasSubstr("no-such-interface"), HasSubstr("fi_info")));
  }
}

INSTANTIATE_TEST_SUITE_P(Providers, SoloEngine, ::testing::Values("tcp", "shm"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace ferry::te
