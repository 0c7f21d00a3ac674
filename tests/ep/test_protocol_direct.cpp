// The Protocol with direct peers: ranks on the same "node" move each other's dispatch sections and
// combine partials themselves (as the CUDA backend does through CUDA IPC), the Protocol moves the
// rest over a real engine (shm, tcp) between real processes. The IPC copies are emulated on the CPU
// through one shared mapping that the parent creates before forking: every rank's receive and
// combine regions live in it, plus epoch flags [dest][sender] that a writer raises (release) after
// its copy. Every rank regenerates every rank's inputs from the seed and checks every byte it
// received, whichever path brought it.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <new>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "csrc/backend.h"
#include "csrc/host/pack.h"
#include "csrc/protocol.h"
#include "csrc/reference.h"
#include "tests/common/a2a_case.h"
#include "tests/common/multiprocess.h"
#include "tests/common/protocol_host.h"
#include "transfer_engine/engine.h"
#include "transfer_engine/error.h"

namespace ferry::ep {
namespace {

constexpr int kTimeoutMs = 20000;
constexpr int kZeroTokenStep = 1;  // in this step of an exchange the last rank has no tokens

using Case = testing::A2aCase;

// The case every test here starts from: four ranks on two nodes, {0, 1} and {2, 3}; direct = same
// node, this rank included. Private regions hold every token (direct peers require it).
Case direct_case() {
  return {.world_size = 4, .num_experts = 8, .top_k = 4, .max_tokens = 16, .hidden = 256, .private_tokens = 16,
          .provider = "shm", .nodes = 2, .steps = 3, .timeout_ms = kTimeoutMs, .launch_timeout_ms = 3 * kTimeoutMs / 2};
}

ferry_a2a_config_t config_of(const Case& c, int rank) { return testing::config_of(c, rank, FERRY_DEVICE_HOST); }

std::vector<uint8_t> direct_flags(const Case& c, int me) {
  std::vector<uint8_t> direct(c.world_size, 0);
  for (int r = 0; r < c.world_size; ++r) direct[r] = testing::node_of(c, r) == testing::node_of(c, me) ? 1 : 0;
  return direct;
}

// Every rank's receive and combine regions and the epoch flags, in one MAP_SHARED|MAP_ANONYMOUS
// mapping: created by the parent before run_ranks, so every forked rank sees the same pages.
class SharedRegions {
 public:
  static constexpr uint8_t kUnwritten = 0xa5;

  SharedRegions(int world_size, uint64_t recv_bytes, uint64_t combine_bytes)
      : world_size_(world_size),
        recv_stride_(align_up(recv_bytes, 4096)),
        combine_stride_(align_up(combine_bytes, 4096)) {
    flags_offset_ = uint64_t(world_size) * (recv_stride_ + combine_stride_);
    bytes_ = flags_offset_ + 2 * sizeof(std::atomic<uint32_t>) * size_t(world_size) * world_size;
    base_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) raise(Status::out_of_memory, "shared regions: mmap of " + std::to_string(bytes_) + " bytes failed");
    std::memset(base_, kUnwritten, flags_offset_);
    auto* flags = reinterpret_cast<std::atomic<uint32_t>*>(bytes() + flags_offset_);
    for (size_t i = 0; i < 2 * size_t(world_size) * world_size; ++i) new (&flags[i]) std::atomic<uint32_t>(0);
  }
  ~SharedRegions() { munmap(base_, bytes_); }
  SharedRegions(const SharedRegions&) = delete;
  SharedRegions& operator=(const SharedRegions&) = delete;

  uint8_t* recv(int rank) const { return bytes() + uint64_t(rank) * recv_stride_; }
  uint8_t* combine(int rank) const { return bytes() + uint64_t(world_size_) * recv_stride_ + uint64_t(rank) * combine_stride_; }
  std::atomic<uint32_t>& dispatch_flag(int dest, int sender) const { return flag(0, dest, sender); }
  std::atomic<uint32_t>& combine_flag(int dest, int sender) const { return flag(1, dest, sender); }

  // Rank `me`'s Protocol buffers: its receive and combine regions here, its send staging the caller's.
  ProtocolBuffers buffers(int me, std::vector<uint8_t>& send, std::vector<uint8_t>& combine_send,
                          std::vector<uint8_t> direct) const {
    ProtocolBuffers b;
    b.send = send.data();
    b.recv = recv(me);
    b.combine_send = combine_send.data();
    b.combine_recv = combine(me);
    b.direct = std::move(direct);
    return b;
  }

 private:
  uint8_t* bytes() const { return static_cast<uint8_t*>(base_); }
  std::atomic<uint32_t>& flag(int kind, int dest, int sender) const {
    auto* flags = reinterpret_cast<std::atomic<uint32_t>*>(bytes() + flags_offset_);
    return flags[(size_t(kind) * world_size_ + dest) * world_size_ + sender];
  }

  int world_size_;
  uint64_t recv_stride_, combine_stride_, flags_offset_ = 0;
  size_t bytes_ = 0;
  void* base_ = nullptr;
};

// Waits until a direct peer raised `flag` to `epoch`; false at the deadline.
bool wait_epoch(const std::atomic<uint32_t>& flag, uint32_t epoch) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kTimeoutMs);
  while (flag.load(std::memory_order_acquire) < epoch) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  return true;
}

// Byte k of the partial that rank `writer` returns for record `index` of `sender`'s run to it.
uint8_t partial_byte(int writer, int sender, int index, int step, uint64_t k) {
  uint64_t x = (uint64_t(writer) << 48) ^ (uint64_t(sender) << 36) ^ (uint64_t(index) << 16) ^ (uint64_t(step) << 12) ^ k;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return uint8_t(x ^ (x >> 31));
}

// What every rank sends in one step, as every rank can recompute it from the seed.
struct StepInputs {
  std::vector<reference::RankInput> inputs;
  std::vector<SendPlan> plans;
  std::vector<std::vector<uint8_t>> send;  // each rank's packed dispatch send buffer
};

StepInputs step_inputs(const Case& c, int step) {
  const ferry_a2a_config_t cfg = config_of(c, 0);
  reference::InputSpec spec;
  spec.seed = 4242 + uint64_t(step);
  // zero_tokens_every = world_size empties exactly the last dp group (dp_size 1: the last rank).
  if (step == kZeroTokenStep) spec.zero_tokens_every = c.world_size;
  StepInputs s;
  s.inputs = reference::generate_all(cfg, spec);
  for (int r = 0; r < c.world_size; ++r) {
    const Layout l = make_layout(config_of(c, r));
    const reference::RankInput& in = s.inputs[r];
    validate_routing(l, in.indices.data(), in.num_tokens);
    s.plans.push_back(make_send_plan(l, in.indices.data(), in.num_tokens, 0));
    s.send.emplace_back(l.send_buffer_bytes(), 0);
    host::pack_dispatch(l, s.plans[r], in.x.data(), nullptr, in.indices.data(), in.weights.data(), s.send[r].data());
  }
  return s;
}

// Index of the first differing byte, or -1.
int64_t first_difference(const uint8_t* got, const uint8_t* want, uint64_t bytes) {
  for (uint64_t i = 0; i < bytes; ++i)
    if (got[i] != want[i]) return int64_t(i);
  return -1;
}

struct RankOptions {
  // Before the combine SEND of this step, first call post_combine() without counts and expect it
  // to be refused (-1: never).
  int refuse_combine_without_counts_step = -1;
};

// One rank: `steps` back-to-back dispatch/combine rounds, the caller moving its direct peers' bytes.
void run_rank(te::Bootstrap& b, const Case& c, const SharedRegions& shared, const RankOptions& options) {
  const int R = c.world_size, me = b.rank();
  const Layout l = make_layout(config_of(c, me));
  const std::vector<uint8_t> direct = direct_flags(c, me);
  te::EngineConfig ec;
  ec.provider = c.provider;
  ec.timeout_ms = kTimeoutMs;
  te::TransferEngine engine(ec, b);
  std::vector<uint8_t> send(l.send_buffer_bytes()), combine_send(l.combine_send_bytes());
  Protocol protocol(l, engine, shared.buffers(me, send, combine_send, direct), kTimeoutMs);
  const uint64_t pb = l.partial_bytes;

  for (int step = 0; step < c.steps; ++step) {
    SCOPED_TRACE("rank " + std::to_string(me) + " step " + std::to_string(step));
    const uint32_t epoch = uint32_t(step) + 1;
    const StepInputs all = step_inputs(c, step);
    const SendPlan& plan = all.plans[me];

    // 1. Dispatch SEND: the direct copies first, then the Protocol's writes.
    protocol.begin_dispatch();
    host::pack_dispatch(l, plan, all.inputs[me].x.data(), nullptr, all.inputs[me].indices.data(),
                        all.inputs[me].weights.data(), send.data());
    for (int d = 0; d < R; ++d) {
      if (!direct[d]) continue;
      const uint64_t section = l.count_header_bytes + uint64_t(plan.dest_count[d]) * l.record_bytes;
      std::memcpy(shared.recv(d) + l.recv_private_offset(me), send.data() + l.send_section_offset(d, plan.dest_offset[d]),
                  section);
      shared.dispatch_flag(d, me).store(epoch, std::memory_order_release);
    }
    protocol.post_dispatch(plan.dest_count, plan.dest_offset);

    // 2. Dispatch RECV: the Protocol's senders, then the direct ones.
    const RecvPlan& recv_plan = protocol.wait_dispatch();
    for (int s = 0; s < R; ++s) {
      if (!direct[s]) continue;
      ASSERT_TRUE(wait_epoch(shared.dispatch_flag(me, s), epoch)) << "no dispatch from direct rank " << s;
    }

    // The Protocol learned exactly what it moved; this rank's own row is what it sent.
    for (int s = 0; s < R; ++s) {
      EXPECT_EQ(recv_plan.count[s], direct[s] ? 0 : all.plans[s].dest_count[me]) << "sender " << s;
      for (int d = 0; d < R; ++d) {
        const int32_t want = s == me ? plan.dest_count[d] : direct[s] ? 0 : all.plans[s].dest_count[d];
        EXPECT_EQ(protocol.count_matrix()[size_t(s) * R + d], want) << "count matrix [" << s << "][" << d << "]";
      }
    }
    uint64_t engine_records = 0;
    for (int d = 0; d < R; ++d)
      if (!direct[d]) engine_records += uint64_t(plan.dest_count[d]);
    EXPECT_EQ(protocol.stats().dispatch_records_sent, engine_records);
    EXPECT_EQ(protocol.stats().overflow_records_sent, 0u);

    // 3. Every sender's private section, header and records, byte for byte.
    std::vector<int32_t> recv_count(R, 0);
    for (int s = 0; s < R; ++s) {
      const SendPlan& sp = all.plans[s];
      recv_count[s] = sp.dest_count[me];
      const uint64_t bytes = l.count_header_bytes + uint64_t(sp.dest_count[me]) * l.record_bytes;
      const uint8_t* want = all.send[s].data() + l.send_section_offset(me, sp.dest_offset[me]);
      const int64_t at = first_difference(shared.recv(me) + l.recv_private_offset(s), want, bytes);
      ASSERT_EQ(at, -1) << "section from rank " << s << (direct[s] ? " (direct)" : " (engine)") << " differs at byte "
                        << at << " of " << bytes;
    }

    // 4. Combine SEND: partials in receive order (sender-major, every sender), direct ones by hand.
    protocol.begin_combine();
    std::vector<int64_t> record_base(R + 1, 0);
    for (int s = 0; s < R; ++s) record_base[s + 1] = record_base[s] + recv_count[s];
    for (int s = 0; s < R; ++s)
      for (int j = 0; j < recv_count[s]; ++j) {
        uint8_t* partial = combine_send.data() + uint64_t(record_base[s] + j) * pb;
        for (uint64_t k = 0; k < pb; ++k) partial[k] = partial_byte(me, s, j, step, k);
      }
    for (int s = 0; s < R; ++s) {
      if (!direct[s]) continue;
      // Sender s's records to this rank sat after its records to ranks before this one.
      const uint64_t slot = uint64_t(all.plans[s].dest_offset[me]);
      std::memcpy(shared.combine(s) + slot * pb, combine_send.data() + uint64_t(record_base[s]) * pb,
                  uint64_t(recv_count[s]) * pb);
      shared.combine_flag(s, me).store(epoch, std::memory_order_release);
    }
    if (step == options.refuse_combine_without_counts_step) {
      try {
        protocol.post_combine();
        ADD_FAILURE() << "post_combine() without receive counts accepted with direct peers";
      } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::internal) << e.what();
        EXPECT_NE(std::string(e.what()).find("needs the receive counts"), std::string::npos) << e.what();
      }
    }
    protocol.post_combine(recv_count);
    uint64_t engine_partials = 0;
    for (int s = 0; s < R; ++s)
      if (!direct[s]) engine_partials += uint64_t(recv_count[s]) * pb;
    EXPECT_EQ(protocol.stats().combine_bytes_sent, engine_partials);

    // 5. Combine RECV, then every slot of every destination, byte for byte.
    protocol.wait_combine();
    for (int d = 0; d < R; ++d) {
      if (!direct[d]) continue;
      ASSERT_TRUE(wait_epoch(shared.combine_flag(me, d), epoch)) << "no partials from direct rank " << d;
    }
    std::vector<uint8_t> want(pb);
    for (int slot = 0; slot < plan.total_records; ++slot) {
      const int d = plan.slot_dest[slot];
      const int index = slot - int(plan.dest_offset[d]);
      for (uint64_t k = 0; k < pb; ++k) want[k] = partial_byte(d, me, index, step, k);
      const int64_t at = first_difference(shared.combine(me) + uint64_t(slot) * pb, want.data(), pb);
      ASSERT_EQ(at, -1) << "combine slot " << slot << " (record " << index << " to rank " << d
                        << (direct[d] ? ", direct" : ", engine") << ") differs at byte " << at;
    }
  }
  b.barrier(kTimeoutMs);
}

void run_case(const Case& c, const RankOptions& options = {}) {
  const Layout l = make_layout(config_of(c, 0));
  SharedRegions shared(c.world_size, l.recv_buffer_bytes(), l.combine_recv_bytes());
  testing::expect_all_ok(
      testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) { run_rank(b, c, shared, options); }));
}

// One rank at the start of step 0 over the shared regions, for the tests that stop the exchange
// early: its engine (default deadline), send staging and Protocol, and every rank's step-0 inputs.
struct FirstStep {
  FirstStep(te::Bootstrap& b, const Case& c, const SharedRegions& shared)
      : me(b.rank()),
        l(make_layout(config_of(c, me))),
        engine(engine_config(c), b),
        send(l.send_buffer_bytes()),
        combine_send(l.combine_send_bytes()),
        protocol(l, engine, shared.buffers(me, send, combine_send, direct_flags(c, me)), kTimeoutMs),
        all(step_inputs(c, 0)) {}

  // This rank's dispatch SEND of step 0, as packed for every rank.
  void post_dispatch() {
    std::memcpy(send.data(), all.send[me].data(), send.size());
    protocol.post_dispatch(all.plans[me].dest_count, all.plans[me].dest_offset);
  }

  static te::EngineConfig engine_config(const Case& c) {
    te::EngineConfig ec;
    ec.provider = c.provider;
    return ec;
  }

  const int me;
  const Layout l;
  te::TransferEngine engine;
  std::vector<uint8_t> send, combine_send;
  Protocol protocol;
  const StepInputs all;
};

// ---- the exchange ----------------------------------------------------------------------------

TEST(ProtocolDirectPeers, SameNodePeersMovedByTheCallerOthersByTheEngineOverShm) {
  Case c = direct_case();
  c.provider = "shm";
  run_case(c);
}

TEST(ProtocolDirectPeers, SameNodePeersMovedByTheCallerOthersByTheEngineOverTcp) {
  Case c = direct_case();
  c.provider = "tcp";
  run_case(c);
}

TEST(ProtocolDirectPeers, OnlySelfDirectEveryPeerThroughTheEngine) {
  Case c = direct_case();
  c.nodes = c.world_size;
  run_case(c);
}

TEST(ProtocolDirectPeers, AllRanksDirectTheEngineMovesNothing) {
  Case c = direct_case();
  c.nodes = 1;
  run_case(c);
}

// ---- misuse ----------------------------------------------------------------------------------

TEST(ProtocolDirectPeers, CombineWithoutReceiveCountsIsRefusedAndSendsNothing) {
  // The refused call leaves the step intact: the same step then completes with the counts, and
  // every partial still lands once, where it belongs.
  Case c = direct_case();
  c.steps = 2;
  RankOptions options;
  options.refuse_combine_without_counts_step = 1;
  run_case(c, options);
}

TEST(ProtocolDirectPeers, ReceiveCountsThatContradictTheHeadersAreRejected) {
  Case c = direct_case();  // step 0 only: every rank has tokens
  const Layout l0 = make_layout(config_of(c, 0));
  SharedRegions shared(c.world_size, l0.recv_buffer_bytes(), l0.combine_recv_bytes());
  const auto results = testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
    const int R = c.world_size, me = b.rank();
    FirstStep step(b, c, shared);
    step.protocol.begin_dispatch();
    step.post_dispatch();
    step.protocol.wait_dispatch();
    step.protocol.begin_combine();
    // Sender (me + 2) % 4 is on the other node: one record more than its header announced.
    const int liar = (me + 2) % R;
    std::vector<int32_t> recv_count(R);
    for (int s = 0; s < R; ++s) recv_count[s] = step.all.plans[s].dest_count[me];
    ++recv_count[liar];
    try {
      step.protocol.post_combine(recv_count);
      ADD_FAILURE() << "receive counts contradicting the count header accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::internal) << e.what();
      const std::string want = "receive count " + std::to_string(recv_count[liar]) + " for sender " +
                               std::to_string(liar) + " but its count header announced " +
                               std::to_string(recv_count[liar] - 1);
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
    b.barrier(kTimeoutMs);
  });
  testing::expect_all_ok(results);
}

TEST(ProtocolDirectPeers, AFailedRankPoisonsItsEnginePeersAndLeavesItsDirectPeersToTheCaller) {
  // Rank 0 cannot take part: ranks 2 and 3 (engine peers) fail at once naming it; rank 1 (same
  // node) does not wait for rank 0 at all, and no poisoned header lands in a direct rank's region.
  Case c = direct_case();
  const Layout l0 = make_layout(config_of(c, 0));
  SharedRegions shared(c.world_size, l0.recv_buffer_bytes(), l0.combine_recv_bytes());
  const auto results = testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
    const int me = b.rank();
    FirstStep step(b, c, shared);
    const Layout& l = step.l;
    step.protocol.begin_dispatch();
    if (me == 0) {
      step.protocol.post_dispatch_failure();
    } else {
      step.post_dispatch();
      const auto started = std::chrono::steady_clock::now();
      try {
        step.protocol.wait_dispatch();
        EXPECT_EQ(me, 1) << "dispatch completed without rank 0";
      } catch (const Error& e) {
        EXPECT_NE(me, 1) << "rank 1 treats rank 0 as direct, yet failed: " << e.what();
        EXPECT_EQ(e.status(), Status::peer_failed) << e.what();
        EXPECT_NE(std::string(e.what()).find("count header from rank 0 reports that its dispatch failed"),
                  std::string::npos)
            << e.what();
      }
      EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::milliseconds(kTimeoutMs / 2))
          << "waited for rank 0 instead of failing or finishing at once";
    }
    b.barrier(kTimeoutMs);
    if (me == 1) {
      for (int dest : {0, 1}) {
        const uint8_t* section = shared.recv(dest) + l.recv_private_offset(0);
        for (uint64_t i = 0; i < l.count_header_bytes; ++i)
          ASSERT_EQ(section[i], SharedRegions::kUnwritten) << "rank 0 wrote into direct rank " << dest << "'s region";
      }
    }
    b.barrier(kTimeoutMs);
  });
  testing::expect_all_ok(results);
}

// Builds a Protocol on every rank of a 2-rank job with the given per-rank setup and expects each
// rank's constructor to fail with `status` and `text`.
void expect_rejected(const std::function<void(int rank, ferry_a2a_config_t&, std::vector<uint8_t>&)>& setup,
                     Status status, const std::function<std::string(int rank)>& text) {
  Case c = direct_case();
  c.world_size = 2;
  c.num_experts = 4;
  const auto results = testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
    ferry_a2a_config_t cfg = config_of(c, b.rank());
    std::vector<uint8_t> direct(2, 1);
    setup(b.rank(), cfg, direct);
    const Layout l = make_layout(cfg);
    te::EngineConfig ec;
    ec.provider = c.provider;
    te::TransferEngine engine(ec, b);
    testing::ProtocolHostRegions regions(l);
    try {
      Protocol protocol(l, engine, regions.buffers(direct), kTimeoutMs);
      ADD_FAILURE() << "protocol created";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), status) << e.what();
      EXPECT_NE(std::string(e.what()).find(text(b.rank())), std::string::npos) << e.what();
    }
    b.barrier(kTimeoutMs);
  });
  testing::expect_all_ok(results);
}

TEST(ProtocolDirectPeers, PrivateRegionSmallerThanMaxTokensIsRejected) {
  expect_rejected([](int, ferry_a2a_config_t& cfg, std::vector<uint8_t>&) { cfg.private_tokens = 4; },
                  Status::invalid_argument,
                  [](int) { return std::string("private_tokens >= max_tokens (private_tokens 4, max_tokens 16)"); });
}

TEST(ProtocolDirectPeers, DataParallelGroupsAreUnsupported) {
  expect_rejected([](int, ferry_a2a_config_t& cfg, std::vector<uint8_t>&) { cfg.dp_size = 2; }, Status::unsupported,
                  [](int) { return std::string("direct peers with dp_size 2"); });
}

TEST(ProtocolDirectPeers, DirectFlagsForTheWrongNumberOfRanksAreRejected) {
  expect_rejected([](int, ferry_a2a_config_t&, std::vector<uint8_t>& direct) { direct.assign(3, 0); },
                  Status::invalid_argument, [](int) { return std::string("3 direct-peer flags for world_size 2"); });
}

TEST(ProtocolDirectPeers, OneSidedDirectFlagsAreRejectedOnEveryRank) {
  // Rank 0 moves rank 1's bytes itself; rank 1 expects them through the engine.
  expect_rejected(
      [](int rank, ferry_a2a_config_t&, std::vector<uint8_t>& direct) {
        if (rank == 1) direct = {0, 1};
      },
      Status::invalid_argument,
      [](int) { return std::string("rank 0 treats rank 1 as a direct peer but rank 1 does not treat rank 0 as one"); });
}

}  // namespace
}  // namespace ferry::ep
