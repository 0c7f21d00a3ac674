// Google Benchmark of the TransferEngine's CPU pieces: the immediate counter (add, consume, the
// wait when its expectations are already met) and a write's whole path through the engine (bounds
// checks, the worker ring, the post, the CQ, the counter) as one rank writing to itself over a real
// provider: tcp and shm.
//
//   ferry-micro-te --benchmark_out=te.json --benchmark_out_format=json
#include <benchmark/benchmark.h>

#include <cstring>
#include <memory>
#include <vector>

#include "transfer_engine/bootstrap.h"
#include "transfer_engine/engine.h"
#include "transfer_engine/imm_counter.h"

namespace ferry::te {
namespace {

// ---- immediate counter ---------------------------------------------------------------------------

// One decode step's immediates at EP64: a count header and a data write from each of 64 senders.
std::vector<uint32_t> step_imms(int senders) {
  std::vector<uint32_t> imms;
  for (int s = 0; s < senders; ++s) {
    imms.push_back(imm::encode(imm::kUserTagBase, s));
    imms.push_back(imm::encode(imm::kUserTagBase + 1, s));
  }
  return imms;
}

void BM_ImmCounterAddThenConsume(benchmark::State& state) {
  ImmCounter counter;
  const std::vector<uint32_t> imms = step_imms(int(state.range(0)));
  for (auto _ : state) {
    for (uint32_t v : imms) counter.add(v);
    for (uint32_t v : imms)
      if (!counter.try_consume(v, 1)) state.SkipWithError("an arrival was lost");
  }
  state.SetItemsProcessed(state.iterations() * int64_t(imms.size()));
}
BENCHMARK(BM_ImmCounterAddThenConsume)->ArgName("senders")->Arg(8)->Arg(64);

void BM_ImmCounterWaitAllMet(benchmark::State& state) {
  ImmCounter counter;
  const std::vector<uint32_t> imms = step_imms(int(state.range(0)));
  std::vector<ImmExpect> expects;
  for (uint32_t v : imms) expects.push_back({v, 1});
  const std::string what = "rank 0 wait";
  for (auto _ : state) {
    for (uint32_t v : imms) counter.add(v);
    wait_for_imms(counter, expects, 1000, what, [] {});
  }
  state.SetItemsProcessed(state.iterations() * int64_t(imms.size()));
}
BENCHMARK(BM_ImmCounterWaitAllMet)->ArgName("senders")->Arg(8)->Arg(64);

// ---- a write through the engine, to itself ---------------------------------------------------------

// A world of one: the TCP bootstrap listens nowhere then, so any address and port do.
std::unique_ptr<Bootstrap> solo_bootstrap() {
  TcpBootstrapConfig config;
  config.master_addr = "127.0.0.1";
  config.master_port = 1;
  config.rank = 0;
  config.world_size = 1;
  config.local_rank = 0;
  return make_tcp_bootstrap(config);
}

struct SoloEngine {
  explicit SoloEngine(const char* provider, size_t bytes) : src(bytes, 1), dst(bytes, 0) {
    bootstrap = solo_bootstrap();
    EngineConfig config;
    config.provider = provider;
    config.timeout_ms = 10000;
    engine = std::make_unique<TransferEngine>(config, *bootstrap);
    src_region = &engine->register_memory(src.data(), src.size());
    dst_region = &engine->register_memory(dst.data(), dst.size());
    const int self = 0;
    const RegionDesc remote = dst_region->desc();
    group = &engine->make_group(std::span<const int>(&self, 1), std::span<const RegionDesc>(&remote, 1));
    // tcp connects on the first write: that belongs to setup, not to the writes measured.
    const uint32_t warm_up = imm::encode(imm::kUserTagBase + 1, 0);
    engine->write(*group, 0, *src_region, 0, 0, 0, warm_up);
    engine->wait(warm_up, 1);
    engine->flush();
  }
  std::unique_ptr<Bootstrap> bootstrap;
  std::unique_ptr<TransferEngine> engine;
  std::vector<uint8_t> src, dst;
  MemoryRegion* src_region = nullptr;
  MemoryRegion* dst_region = nullptr;
  PeerGroup* group = nullptr;
};

// One write and the wait for its immediate: the latency a protocol step pays per dependent write.
void BM_EngineWriteWait(benchmark::State& state, const char* provider) {
  const size_t bytes = size_t(state.range(0));
  SoloEngine s(provider, bytes == 0 ? 64 : bytes);
  const uint32_t value = imm::encode(imm::kUserTagBase, 0);
  for (auto _ : state) {
    s.engine->write(*s.group, 0, *s.src_region, 0, 0, bytes, value);
    s.engine->wait(value, 1);
  }
  s.engine->flush();
  state.SetItemsProcessed(state.iterations());
  state.SetBytesProcessed(state.iterations() * int64_t(bytes));
}
BENCHMARK_CAPTURE(BM_EngineWriteWait, tcp, "tcp")->ArgName("bytes")->Arg(0)->Arg(4096)->UseRealTime();
BENCHMARK_CAPTURE(BM_EngineWriteWait, shm, "shm")->ArgName("bytes")->Arg(0)->Arg(4096)->UseRealTime();

// A burst of writes through the ring, then one wait for all of them: the ring's message rate.
void BM_EngineWriteBurst(benchmark::State& state, const char* provider) {
  const int burst = int(state.range(0));
  SoloEngine s(provider, 64);
  const uint32_t value = imm::encode(imm::kUserTagBase, 0);
  for (auto _ : state) {
    for (int i = 0; i < burst; ++i) s.engine->write(*s.group, 0, *s.src_region, 0, 0, 64, value);
    s.engine->wait(value, uint32_t(burst));
    s.engine->flush();
  }
  state.SetItemsProcessed(state.iterations() * burst);
}
BENCHMARK_CAPTURE(BM_EngineWriteBurst, tcp, "tcp")->ArgName("writes")->Arg(64)->UseRealTime();
BENCHMARK_CAPTURE(BM_EngineWriteBurst, shm, "shm")->ArgName("writes")->Arg(64)->UseRealTime();

}  // namespace
}  // namespace ferry::te

BENCHMARK_MAIN();
