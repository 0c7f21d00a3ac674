// ferry-te-bench: what the TransferEngine costs over libfabric itself. For each size it measures
// single-write bandwidth and ping-pong latency between ranks 0 and 1, and the scatter message rate
// of all ranks, once through the engine and once through a raw loop (fi_writedata + fi_cq_read on
// the caller's thread, no worker, no queue) on the same provider, and prints both with their ratio.
// A third run puts the raw loop on a thread of its own that the caller hands writes to and reads
// arrivals from (two atomics, the engine's spin-then-yield), the least any design pays whose
// callers never touch libfabric: engine / that is what the engine's own machinery costs, and
// that / raw is what the thread hand-off costs on this machine (large when ranks' threads
// outnumber its cores).
//
//   ferry-te-bench --ranks 2 --provider tcp          # self-spawns two local ranks
//   torchrun --nproc-per-node 4 ... ferry-te-bench   # or any launcher tools/common understands
#include <CLI/CLI.hpp>
#include <rdma/fi_rma.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "tools/common/bootstrap.h"
#include "tools/common/env.h"
#include "tools/common/launch.h"
#include "tools/common/report.h"
#include "transfer_engine/engine.h"
#include "transfer_engine/fabric/nic.h"

namespace ferry::bench {
namespace {

using Clock = std::chrono::steady_clock;
namespace te = ferry::te;

struct Options {
  std::string provider = "tcp";
  std::string domains;
  int nets = 1;
  int ranks = 0;
  uint64_t min_bytes = 8;
  uint64_t max_bytes = 16 << 20;
  uint64_t bytes_per_point = 64 << 20;  // bandwidth: this many bytes per size (bounded iterations)
  int latency_iters = 200;
  uint64_t scatter_bytes = 64;
  int scatter_rounds = 2000;
  int timeout_ms = 120000;
  bool skip_raw = false;
};

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

int bandwidth_iters(const Options& o, uint64_t bytes) {
  return static_cast<int>(std::clamp<uint64_t>(o.bytes_per_point / bytes, 8, 2000));
}
int latency_iters(const Options& o, uint64_t bytes) {
  // Large ping-pongs are bandwidth-bound; fewer of them say as much.
  return static_cast<int>(std::clamp<uint64_t>(o.latency_iters * 4096 / std::max<uint64_t>(bytes, 4096),
                                               5, static_cast<uint64_t>(o.latency_iters)));
}

struct Point {
  double bandwidth_gbps = 0;  // GB/s, rank 0 -> rank 1
  double latency_us = 0;      // one way, half a ping-pong
};
struct Results {
  std::map<uint64_t, Point> points;
  double scatter_mmsgs = 0;  // million messages per second, all ranks together
};

// --- raw libfabric loop --------------------------------------------------------------------------

class Raw {
 public:
  // Every write carries `imm`.
  Raw(const Options& o, te::Bootstrap& b, uint64_t buffer_bytes, uint32_t imm)
      : b_(b), send_(buffer_bytes, 1), recv_(buffer_bytes, 0), imm_(imm) {
    te::fabric::NicOptions nic_options;
    nic_options.provider = o.provider;
    nic_options.domain = o.domains.empty() ? (o.provider == "tcp" ? "lo" : "")
                                           : o.domains.substr(0, o.domains.find(','));
    nic_options.rank = b.rank();
    nic_ = std::make_unique<te::fabric::Nic>(nic_options);
    const auto& mine = nic_->address();
    std::vector<uint8_t> slot(256, 0), all(256 * b.world_size());
    slot[0] = static_cast<uint8_t>(mine.size());
    std::copy(mine.begin(), mine.end(), slot.begin() + 1);
    b.allgather(slot.data(), slot.size(), all.data(), o.timeout_ms);
    std::vector<std::vector<uint8_t>> addresses;
    for (int r = 0; r < b.world_size(); ++r) {
      const uint8_t* s = all.data() + 256 * r;
      addresses.emplace_back(s + 1, s + 1 + s[0]);
    }
    addrs_ = nic_->insert_addresses(addresses);
    send_mr_ = nic_->register_memory(send_.data(), send_.size(), te::MemoryKind::host, -1, 1);
    recv_mr_ = nic_->register_memory(recv_.data(), recv_.size(), te::MemoryKind::host, -1, 2);
    struct Remote {
      uint64_t addr, key;
    } me{nic_->caps().virt_addr ? reinterpret_cast<uint64_t>(recv_.data()) : 0,
         fi_mr_key(recv_mr_.get())};
    remotes_.resize(b.world_size());
    b.allgather(&me, sizeof(me), remotes_.data(), o.timeout_ms);
    contexts_.resize(kContexts);
    timeout_ms_ = o.timeout_ms;
  }

  void write(int peer, uint64_t bytes) {
    fid_ep* ep = nic_->endpoint();
    void* desc = fi_mr_desc(send_mr_.get());
    for (;;) {
      ssize_t rc = fi_writedata(ep, send_.data(), bytes, desc, imm_, addrs_[peer],
                                remotes_[peer].addr, remotes_[peer].key,
                                &contexts_[posted_++ % kContexts]);
      if (rc == 0) {
        ++outstanding_;
        return;
      }
      --posted_;
      if (rc != -FI_EAGAIN) raise(Status::transport, te::fabric::fi_error_text("fi_writedata", rc));
      poll();
    }
  }

  void poll() {
    fi_cq_data_entry entries[32];
    ssize_t n = fi_cq_read(nic_->cq(), entries, 32);
    if (n == -FI_EAGAIN) return;
    if (n < 0) {
      fi_cq_err_entry err{};
      std::string text;
      nic_->read_error(err, text);
      raise(Status::transport, "raw loop: completion error: " + text);
    }
    for (ssize_t i = 0; i < n; ++i) {
      if (entries[i].flags & FI_REMOTE_CQ_DATA) {
        ++arrived_;
        ++total_arrived_;
      } else {
        --outstanding_;
      }
    }
  }
  uint64_t total_arrived() const { return total_arrived_; }
  int64_t outstanding() const { return outstanding_; }

  // Waits for `count` arrivals beyond those already consumed, then consumes them.
  void wait_arrivals(uint64_t count) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms_);
    while (arrived_ < count) {
      poll();
      if (Clock::now() > deadline) raise(Status::timeout, "raw loop: arrivals missing");
    }
    arrived_ -= count;
  }
  void drain() {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms_);
    while (outstanding_ > 0) {
      poll();
      if (Clock::now() > deadline) raise(Status::timeout, "raw loop: writes not completing");
    }
  }

 private:
  static constexpr size_t kContexts = 1 << 14;
  te::Bootstrap& b_;
  std::unique_ptr<te::fabric::Nic> nic_;
  std::vector<fi_addr_t> addrs_;
  std::vector<uint8_t> send_, recv_;
  te::fabric::FidPtr<fid_mr> send_mr_, recv_mr_;
  struct RemoteRegion {
    uint64_t addr, key;
  };
  std::vector<RemoteRegion> remotes_;
  std::vector<fi_context2> contexts_;
  uint64_t posted_ = 0;
  int64_t outstanding_ = 0;
  uint64_t arrived_ = 0;
  uint64_t total_arrived_ = 0;
  int timeout_ms_ = 0;
  uint32_t imm_;
};

void pause_then_yield() {
  for (int i = 0; i < 16; ++i) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  std::this_thread::yield();
}

// The raw loop on its own thread: the caller queues writes (a single-producer ring) and watches the
// arrival count the thread publishes. Nothing else between them.
class RawThread {
 public:
  RawThread(const Options& o, te::Bootstrap& b, uint64_t buffer_bytes, uint32_t imm)
      : raw_(o, b, buffer_bytes, imm), timeout_ms_(o.timeout_ms) {
    thread_ = std::thread([this] { loop(); });
  }
  ~RawThread() {
    stop_.store(true, std::memory_order_release);
    thread_.join();
  }

  void write(int peer, uint64_t bytes) {
    const uint64_t tail = tail_.load(std::memory_order_relaxed);
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms_);
    while (tail - head_.load(std::memory_order_acquire) >= kRing) {
      check(deadline, "write queue full");
      pause_then_yield();
    }
    ring_[tail % kRing] = {peer, bytes};
    tail_.store(tail + 1, std::memory_order_release);
  }
  void wait_arrivals(uint64_t count) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms_);
    while (arrived_.load(std::memory_order_acquire) < consumed_ + count) {
      check(deadline, "arrivals missing");
      pause_then_yield();
    }
    consumed_ += count;
  }
  void drain() {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms_);
    const uint64_t target = tail_.load(std::memory_order_relaxed);
    while (done_.load(std::memory_order_acquire) < target) {
      check(deadline, "writes not completing");
      pause_then_yield();
    }
  }

 private:
  struct Request {
    int peer;
    uint64_t bytes;
  };
  static constexpr uint64_t kRing = 4096;

  void check(Clock::time_point deadline, const char* what) {
    if (failed_.load(std::memory_order_acquire)) raise(Status::transport, "raw thread: " + error_);
    if (Clock::now() > deadline) raise(Status::timeout, std::string("raw thread: ") + what);
  }
  void loop() {
    try {
      uint64_t head = 0;
      while (!stop_.load(std::memory_order_acquire)) {
        bool busy = false;
        const uint64_t tail = tail_.load(std::memory_order_acquire);
        for (; head < tail; ++head) {
          raw_.write(ring_[head % kRing].peer, ring_[head % kRing].bytes);
          busy = true;
        }
        head_.store(head, std::memory_order_release);
        const uint64_t before = raw_.total_arrived();
        const int64_t outstanding = raw_.outstanding();
        raw_.poll();
        busy |= raw_.total_arrived() != before || raw_.outstanding() != outstanding;
        arrived_.store(raw_.total_arrived(), std::memory_order_release);
        if (raw_.outstanding() == 0) done_.store(head, std::memory_order_release);
        if (!busy) pause_then_yield();
      }
    } catch (const std::exception& e) {
      error_ = e.what();
      failed_.store(true, std::memory_order_release);
    }
  }

  Raw raw_;
  const int timeout_ms_;
  Request ring_[kRing];
  alignas(64) std::atomic<uint64_t> tail_{0};
  alignas(64) std::atomic<uint64_t> head_{0};
  alignas(64) std::atomic<uint64_t> arrived_{0};
  alignas(64) std::atomic<uint64_t> done_{0};
  uint64_t consumed_ = 0;  // caller-only
  std::atomic<bool> stop_{false};
  std::atomic<bool> failed_{false};
  std::string error_;
  std::thread thread_;
};

// --- the same three measurements, over either transport --------------------------------------------

// Ops: write(peer, bytes), wait(peer, count, bytes of each awaited write), barrier().
template <typename Write, typename Wait, typename Barrier>
Results measure(const Options& o, te::Bootstrap& b, const std::vector<uint64_t>& sizes,
                Write&& write, Wait&& wait, Barrier&& barrier) {
  Results results;
  const int me = b.rank(), world = b.world_size();
  for (uint64_t bytes : sizes) {
    Point point;
    // Bandwidth: a window of writes, then one zero-byte acknowledgement back.
    const int iters = bandwidth_iters(o, bytes);
    for (int pass = 0; pass < 2; ++pass) {  // pass 0 warms up connections and caches
      const int n = pass == 0 ? std::min(iters, 4) : iters;
      barrier();
      const auto start = Clock::now();
      if (me == 0) {
        for (int i = 0; i < n; ++i) write(1, bytes);
        wait(1, 1, 0);
        if (pass == 1) point.bandwidth_gbps = bytes * double(n) / seconds_since(start) / 1e9;
      } else if (me == 1) {
        wait(0, n, bytes);
        write(0, 0);
      }
    }
    // Latency: ping-pong.
    const int lat = latency_iters(o, bytes);
    barrier();
    const auto start = Clock::now();
    for (int i = 0; i < lat; ++i) {
      if (me == 0) {
        write(1, bytes);
        wait(1, 1, bytes);
      } else if (me == 1) {
        wait(0, 1, bytes);
        write(0, bytes);
      }
    }
    if (me == 0) point.latency_us = seconds_since(start) * 1e6 / lat / 2;
    results.points[bytes] = point;
  }
  // Scatter rate: every rank sends scatter_rounds messages to every peer, then waits for theirs.
  for (int pass = 0; pass < 2; ++pass) {
    const int rounds = pass == 0 ? 10 : o.scatter_rounds;
    barrier();
    const auto start = Clock::now();
    for (int r = 0; r < rounds; ++r)
      for (int p = 1; p < world; ++p) write((me + p) % world, o.scatter_bytes);
    for (int p = 1; p < world; ++p) wait((me + p) % world, rounds, o.scatter_bytes);
    const double elapsed = seconds_since(start);
    barrier();
    if (pass == 1) {
      std::vector<double> rate{rounds * double(world - 1) / elapsed};
      std::vector<double> all = tools::allgather_values(b, rate, o.timeout_ms);
      for (double v : all) results.scatter_mmsgs += v / 1e6;
    }
  }
  return results;
}

// The three measurements over a raw loop (Raw, or RawThread on its own thread).
template <typename Loop>
Results run_loop(const Options& o, te::Bootstrap& b, const std::vector<uint64_t>& sizes) {
  Loop raw(o, b, std::max(o.max_bytes, o.scatter_bytes), te::imm::encode(te::imm::kUserTagBase, b.rank()));
  Results r = measure(
      o, b, sizes, [&](int peer, uint64_t bytes) { raw.write(peer, bytes); },
      [&](int, uint64_t count, uint64_t) { raw.wait_arrivals(count); },
      [&] {
        raw.drain();
        b.barrier(o.timeout_ms);
      });
  raw.drain();
  b.barrier(o.timeout_ms);
  return r;
}

Results run_engine(const Options& o, te::Bootstrap& b, const std::vector<uint64_t>& sizes,
                   std::string& provider_name) {
  te::EngineConfig config;
  config.provider = o.provider;
  config.nets_per_rank = o.nets;
  if (!o.domains.empty()) {
    size_t start = 0;
    while (start <= o.domains.size()) {
      size_t end = o.domains.find(',', start);
      if (end == std::string::npos) end = o.domains.size();
      if (end > start) config.domains.push_back(o.domains.substr(start, end - start));
      start = end + 1;
    }
  }
  config.timeout_ms = o.timeout_ms;
  te::TransferEngine engine(config, b);
  provider_name = engine.provider();
  const uint64_t buffer_bytes = std::max(o.max_bytes, o.scatter_bytes);
  std::vector<uint8_t> send(buffer_bytes, 1), recv(buffer_bytes, 0);
  te::MemoryRegion& src = engine.register_memory(send.data(), send.size());
  te::MemoryRegion& dst = engine.register_memory(recv.data(), recv.size());
  std::vector<te::RegionDesc> remotes = engine.exchange(dst);
  std::vector<int> ranks(b.world_size());
  for (int r = 0; r < b.world_size(); ++r) ranks[r] = r;
  te::PeerGroup& group = engine.make_group(ranks, remotes);
  const uint32_t tag = te::imm::kUserTagBase;
  const uint32_t mine = te::imm::encode(tag, b.rank());
  return measure(
      o, b, sizes,
      [&](int peer, uint64_t bytes) {
        engine.write(group, peer, src, 0, 0, bytes, mine);
      },
      [&](int peer, uint64_t count, uint64_t bytes) {
        engine.wait(te::imm::encode(tag, peer), count * engine.pieces_for(bytes), o.timeout_ms);
      },
      [&] {
        engine.flush(o.timeout_ms);
        b.barrier(o.timeout_ms);
      });
}

std::string ratio(double engine, double raw) {
  return raw > 0 ? tools::format("%.2f", engine / raw) : "-";
}

int bench_main(const Options& o) {
  const tools::RankEnv env = tools::discover_rank_env();
  std::unique_ptr<te::Bootstrap> bootstrap = tools::make_bootstrap(env, o.timeout_ms);
  te::Bootstrap& b = *bootstrap;
  if (b.world_size() < 2) {
    std::fprintf(stderr, "ferry-te-bench needs at least 2 ranks: use --ranks N or a launcher\n");
    return 2;
  }
  std::vector<uint64_t> sizes;
  for (uint64_t s = o.min_bytes; s <= o.max_bytes; s *= 8) sizes.push_back(s);
  Results raw, raw_thread;
  if (!o.skip_raw) {
    raw = run_loop<Raw>(o, b, sizes);
    raw_thread = run_loop<RawThread>(o, b, sizes);
  }
  std::string provider_name;
  Results engine = run_engine(o, b, sizes, provider_name);
  if (b.rank() != 0) return 0;

  std::printf("ferry-te-bench: provider %s, %d ranks, %d NIC(s) per rank; bandwidth and latency "
              "rank 0 -> rank 1, scatter all ranks\n",
              provider_name.c_str(), b.world_size(), o.nets);
  tools::Table table;
  table.add_column("bytes");
  table.add_column("engine GB/s");
  table.add_column("raw GB/s");
  table.add_column("ratio");
  table.add_column("engine us");
  table.add_column("raw us");
  table.add_column("ratio");
  table.add_column("raw+thread GB/s");
  table.add_column("raw+thread us");
  table.add_column("engine/raw+thread GB/s, us");
  for (uint64_t s : sizes) {
    const Point& e = engine.points[s];
    const Point& r = raw.points[s];
    const Point& t = raw_thread.points[s];
    table.add_row({tools::format_bytes(double(s)), tools::format("%.3f", e.bandwidth_gbps),
                   tools::format("%.3f", r.bandwidth_gbps), ratio(e.bandwidth_gbps, r.bandwidth_gbps),
                   tools::format("%.1f", e.latency_us), tools::format("%.1f", r.latency_us),
                   ratio(e.latency_us, r.latency_us), tools::format("%.3f", t.bandwidth_gbps),
                   tools::format("%.1f", t.latency_us),
                   ratio(e.bandwidth_gbps, t.bandwidth_gbps) + ", " + ratio(e.latency_us, t.latency_us)});
  }
  table.print();
  std::printf("ratio = engine / raw: above 1 is better for GB/s and Mmsg/s, below 1 for us; raw+thread: the raw "
              "loop on its own thread, fed by the caller (the hand-off every design pays whose callers never "
              "touch libfabric)\n");
  std::printf("\nscatter of %llu-byte messages to every peer, %d rounds, all ranks: engine %.3f "
              "Mmsg/s, raw %.3f Mmsg/s, ratio %s\n",
              static_cast<unsigned long long>(o.scatter_bytes), o.scatter_rounds,
              engine.scatter_mmsgs, raw.scatter_mmsgs, ratio(engine.scatter_mmsgs, raw.scatter_mmsgs).c_str());
  return 0;
}

}  // namespace
}  // namespace ferry::bench

int main(int argc, char** argv) {
  ferry::bench::Options o;
  CLI::App app{"ferry-te-bench: TransferEngine vs raw libfabric (bandwidth, latency, scatter rate)"};
  app.add_option("--provider", o.provider, "libfabric provider: tcp, shm, efa, efa-direct");
  app.add_option("--domains", o.domains, "comma-separated domain/interface names, one per NIC");
  app.add_option("--nets", o.nets, "NICs per rank for the engine")->check(CLI::Range(1, 8));
  app.add_option("--ranks", o.ranks, "start this many local ranks (self-spawning)");
  app.add_option("--min-bytes", o.min_bytes, "smallest write")->check(CLI::PositiveNumber);
  app.add_option("--max-bytes", o.max_bytes, "largest write (sizes grow by 8x)");
  app.add_option("--bytes-per-point", o.bytes_per_point, "bandwidth: bytes moved per size");
  app.add_option("--latency-iters", o.latency_iters, "ping-pongs for small sizes");
  app.add_option("--scatter-bytes", o.scatter_bytes, "scatter message size");
  app.add_option("--scatter-rounds", o.scatter_rounds, "scatter rounds (one message per peer each)");
  app.add_option("--timeout-ms", o.timeout_ms, "deadline for every wait");
  app.add_flag("--skip-raw", o.skip_raw, "measure the engine only");
  CLI11_PARSE(app, argc, argv);
  try {
    if (o.ranks > 1 && !ferry::tools::is_local_launch_child()) {
      ferry::tools::LocalLaunchOptions launch;
      launch.num_ranks = o.ranks;
      launch.timeout_ms = o.timeout_ms * 4;
      for (int i = 1; i < argc; ++i) {
        std::string arg = argv[i];
        if (arg == "--ranks") {
          ++i;
          continue;
        }
        if (arg.rfind("--ranks=", 0) == 0) continue;
        launch.args.push_back(arg);
      }
      return ferry::tools::run_local_ranks(launch);
    }
    return ferry::bench::bench_main(o);
  } catch (const ferry::Error& e) {
    std::fprintf(stderr, "ferry-te-bench: %s [%s]\n", e.what(), ferry::status_name(e.status()));
    return 1;
  }
}
