// Stages 2 and 3: every NIC writes to itself through the fabric (verified), then every pair of ranks
// measures small-write latency and large-write bandwidth on every NIC slot, one partner at a time.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>

#include "tools/check/check.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

namespace ferry::check {

using Clock = std::chrono::steady_clock;
namespace imm = te::imm;

namespace {

// Immediate tags of the checker (each carries the sender's rank, so one tag serves every pair).
enum Tag : uint32_t {
  kLoopForward = imm::kUserTagBase + 0,
  kLoopBack = imm::kUserTagBase + 1,
  kPing = imm::kUserTagBase + 2,
  kPong = imm::kUserTagBase + 3,
  kBulk = imm::kUserTagBase + 4,
  kBulkAck = imm::kUserTagBase + 5,
};

constexpr uint64_t kSmallSlotBytes = 64;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// Bytes a writer puts on the wire for (src, dst, slot): a receiver can check every byte without
// having been told anything.
void fill_pattern(uint8_t* p, uint64_t bytes, uint32_t seed) {
  uint32_t x = seed * 2654435761u + 0x9e3779b9u;
  for (uint64_t i = 0; i < bytes; ++i) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    p[i] = uint8_t(x >> 11);
  }
}

// Empty when equal, else where the first difference is.
std::string compare_pattern(const uint8_t* got, uint64_t bytes, uint32_t seed) {
  std::vector<uint8_t> want(bytes);
  fill_pattern(want.data(), bytes, seed);
  for (uint64_t i = 0; i < bytes; ++i) {
    if (got[i] != want[i]) {
      uint64_t wrong = 0;
      for (uint64_t j = i; j < bytes; ++j) wrong += got[j] != want[j];
      return "data mismatch: " + std::to_string(wrong) + " of " + std::to_string(bytes) +
             " bytes differ, first at offset " + std::to_string(i) + " (got " + std::to_string(got[i]) +
             ", expected " + std::to_string(want[i]) + ")";
    }
  }
  return "";
}

uint32_t pair_seed(int src, int dst, int slot) { return uint32_t(src) * 7919u + uint32_t(dst) * 104729u + uint32_t(slot) * 31u + 1; }

double us_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

}  // namespace

// One NIC slot: an engine on this rank's NIC for the slot and one registered buffer laid out as
//   [loop A | loop B | loop C] [small in: one 64 B cell per sender] [small out] [ack out]
//   [ack in: one cell per sender] [bulk out] [bulk in: bw_bytes per sender]
// Per-sender cells mean a partner that runs ahead into the next round never overwrites the bytes
// this rank is still checking.
struct SlotEngines::Slot {
  int index = 0;
  std::string nic;        // this rank's NIC for the slot (named even when absent, for the report)
  std::string problem;    // why this rank cannot take part in this slot's checks
  // Declared before the engine so it is freed after the engine has deregistered it.
  std::unique_ptr<uint8_t, FreeDeleter> memory;
  std::unique_ptr<te::TransferEngine> engine;
  uint64_t bytes = 0;
  te::MemoryRegion* region = nullptr;
  te::PeerGroup* group = nullptr;  // every rank, peer index == rank

  uint64_t loop_bytes = 0, bulk_bytes = 0;
  int world = 0;
  uint64_t loop_a() const { return 0; }
  uint64_t loop_b() const { return loop_bytes; }
  uint64_t loop_c() const { return 2 * loop_bytes; }
  uint64_t small_in(int sender) const { return 3 * loop_bytes + uint64_t(sender) * kSmallSlotBytes; }
  uint64_t small_out() const { return small_in(world); }
  uint64_t ack_out() const { return small_out() + kSmallSlotBytes; }
  uint64_t ack_in(int sender) const { return ack_out() + kSmallSlotBytes + uint64_t(sender) * kSmallSlotBytes; }
  uint64_t bulk_out() const { return ack_in(world); }
  uint64_t bulk_in(int sender) const { return bulk_out() + bulk_bytes + uint64_t(sender) * bulk_bytes; }
  uint64_t total() const { return bulk_in(world); }
  uint8_t* at(uint64_t offset) const { return memory.get() + offset; }
};

SlotEngines::SlotEngines(const Options& opt, te::Bootstrap& boot, const std::vector<RankInventory>& all) {
  const RankInventory& me = all[size_t(boot.rank())];
  const int n = max_slots(all);
  // The engine lets FERRY_DOMAINS override its config; here each engine must open exactly its
  // slot's NIC (the inventory has already taken the variable into account).
  ::unsetenv("FERRY_DOMAINS");
  // The NIC this rank joins a slot's engine through when it has none of its own for that slot.
  std::string fallback;
  for (int s = 0; s < int(me.nics.size()) && fallback.empty(); ++s)
    if (nic_problem(me, s).empty()) fallback = me.nics[size_t(s)];
  for (int s = 0; s < n; ++s) {
    auto slot = std::make_unique<Slot>();
    slot->index = s;
    slot->problem = nic_problem(me, s);
    slot->nic = s < int(me.nics.size()) ? me.nics[size_t(s)] : "";
    te::EngineConfig config;
    config.provider = opt.provider;
    const std::string domain = slot->problem.empty() ? slot->nic : fallback;
    if (!domain.empty()) config.domains = {domain};
    config.nets_per_rank = 1;
    config.timeout_ms = opt.timeout_ms;
    // Several ranks per host on a small machine: pinning them all near one NIC would stack them on
    // the same cores and turn the bandwidth numbers into a scheduler measurement.
    config.pin_worker = false;
    slot->engine = std::make_unique<te::TransferEngine>(config, boot);
    slot->world = boot.world_size();
    slot->loop_bytes = uint64_t(opt.loopback_bytes);
    slot->bulk_bytes = uint64_t(opt.bw_bytes);
    slot->bytes = slot->total();
    void* p = nullptr;
    if (posix_memalign(&p, 4096, slot->bytes) != 0)
      raise(Status::out_of_memory, "rank " + std::to_string(boot.rank()) + ": " + std::to_string(slot->bytes) +
                                       " bytes for the link checks of NIC slot " + std::to_string(s));
    std::memset(p, 0, slot->bytes);
    slot->memory.reset(static_cast<uint8_t*>(p));
    slot->region = &slot->engine->register_memory(p, slot->bytes);
    const std::vector<te::RegionDesc> descs = slot->engine->exchange(*slot->region, opt.timeout_ms);
    std::vector<int> ranks(size_t(boot.world_size()));
    for (int r = 0; r < boot.world_size(); ++r) ranks[size_t(r)] = r;
    slot->group = &slot->engine->make_group(ranks, descs);
    slots_.push_back(std::move(slot));
  }
}

SlotEngines::~SlotEngines() = default;

int num_rounds(int world_size) { return world_size <= 1 ? 0 : (world_size % 2 == 0 ? world_size - 1 : world_size); }

int round_partner(int rank, int round, int world_size) {
  const int padded = world_size + (world_size % 2);  // an odd world gets a phantom rank: the bye
  const int m = padded - 1;
  int partner;
  if (rank == m) partner = round;
  else if (rank == round) partner = m;
  else partner = ((2 * round - rank) % m + m) % m;
  return partner >= world_size ? -1 : partner;
}

static std::string describe(const RankInventory& inv, const std::string& nic) {
  return "rank " + std::to_string(inv.rank) + " (" + inv.host + ", " + (nic.empty() ? "no NIC" : nic) + ")";
}

Share run_loopback(const Options& opt, SlotEngines& engines, const std::vector<RankInventory>& all) {
  Share share;
  for (int s = 0; s < engines.num_slots(); ++s) {
    SlotEngines::Slot& slot = engines.slot(s);
    te::TransferEngine& e = *slot.engine;
    const int me = e.rank();
    const RankInventory& inv = all[size_t(me)];
    CheckResult c{"nic_loopback", "rank " + std::to_string(me) + " " + (slot.nic.empty() ? "slot " + std::to_string(s) : slot.nic) +
                                      " on " + inv.host,
                  Verdict::pass, "", nlohmann::json::object()};
    c.metrics["slot"] = s;
    c.metrics["nic"] = slot.nic;
    c.metrics["host"] = inv.host;
    c.metrics["rank"] = me;
    if (!slot.problem.empty()) {
      c.verdict = Verdict::fail;
      c.reason = slot.problem;
      rank_failure(me, c.reason);
      share.checks.push_back(std::move(c));
      continue;
    }
    const uint32_t seed = pair_seed(me, me, s) ^ 0x5a5a5a5au;
    const uint64_t bytes = slot.loop_bytes;
    try {
      fill_pattern(slot.at(slot.loop_a()), bytes, seed);
      std::memset(slot.at(slot.loop_b()), 0, bytes);
      std::memset(slot.at(slot.loop_c()), 0, bytes);
      const auto t0 = Clock::now();
      const uint32_t fwd = imm::encode(kLoopForward, uint32_t(me));
      e.write(*slot.group, size_t(me), *slot.region, slot.loop_a(), slot.loop_b(), bytes, fwd);
      e.wait(fwd, e.pieces_for(bytes), opt.timeout_ms);
      const double write_us = us_since(t0);
      std::string bad = compare_pattern(slot.at(slot.loop_b()), bytes, seed);
      if (!bad.empty()) raise(Status::internal, "loopback write: " + bad);
      // Back again: the second copy only matches if the first one landed intact and was readable.
      const uint32_t back = imm::encode(kLoopBack, uint32_t(me));
      e.write(*slot.group, size_t(me), *slot.region, slot.loop_b(), slot.loop_c(), bytes, back);
      e.wait(back, e.pieces_for(bytes), opt.timeout_ms);
      bad = compare_pattern(slot.at(slot.loop_c()), bytes, seed);
      if (!bad.empty()) raise(Status::internal, "loopback copy back: " + bad);
      e.flush(opt.timeout_ms);
      c.metrics["bytes"] = bytes;
      c.metrics["write_us"] = write_us;
      c.metrics["gbps"] = write_us > 0 ? double(bytes) * 8 / (write_us * 1e3) : 0.0;
    } catch (const std::exception& ex) {
      c.verdict = Verdict::fail;
      c.reason = "NIC " + slot.nic + " of rank " + std::to_string(me) + " on " + inv.host + ": " + ex.what();
      rank_failure(me, c.reason);
    }
    share.checks.push_back(std::move(c));
  }
  return share;
}

namespace {

struct PairRun {
  const Options& opt;
  SlotEngines::Slot& slot;
  te::TransferEngine& e;
  int me;
  int peer;
  const RankInventory& my_inv;
  const RankInventory& peer_inv;
  std::string peer_nic;

  LinkResult blank() const {
    LinkResult l;
    l.slot = slot.index;
    l.src = me;
    l.dst = peer;
    l.src_host = my_inv.host;
    l.dst_host = peer_inv.host;
    l.src_nic = slot.nic;
    l.dst_nic = peer_nic;
    return l;
  }

  // Half round trips in microseconds; the lower rank of the pair starts each round trip.
  std::vector<double> ping_pong() {
    const bool starter = me < peer;
    const uint32_t ping = imm::encode(kPing, uint32_t(starter ? me : peer));
    const uint32_t pong = imm::encode(kPong, uint32_t(starter ? peer : me));
    const uint64_t bytes = uint64_t(std::clamp(opt.latency_bytes, 0, int(kSmallSlotBytes)));
    const int warmup = std::max(2, opt.latency_iters / 10);
    std::vector<double> half_rtt_us;
    for (int i = 0; i < warmup + opt.latency_iters; ++i) {
      if (starter) {
        const auto t0 = Clock::now();
        e.write(*slot.group, size_t(peer), *slot.region, slot.small_out(), slot.small_in(me), bytes, ping);
        e.wait(pong, 1, opt.timeout_ms);
        if (i >= warmup) half_rtt_us.push_back(us_since(t0) / 2);
      } else {
        e.wait(ping, 1, opt.timeout_ms);
        e.write(*slot.group, size_t(peer), *slot.region, slot.small_out(), slot.small_in(me), bytes, pong);
      }
    }
    return half_rtt_us;
  }

  // Sends the bulk writes to the peer and times them until its acknowledgement; returns Gbps.
  double send_bulk() {
    fill_pattern(slot.at(slot.bulk_out()), slot.bulk_bytes, pair_seed(me, peer, slot.index));
    const uint32_t data = imm::encode(kBulk, uint32_t(me));
    const uint32_t ack = imm::encode(kBulkAck, uint32_t(peer));
    // Best of several bursts: on a shared host one burst can lose the CPU to a neighbour, and a
    // link is judged by what it can carry, not by the scheduler.
    double best_us = 0;
    for (int rep = 0; rep < opt.bw_reps; ++rep) {
      const auto t0 = Clock::now();
      for (int i = 0; i < opt.bw_iters; ++i)
        e.write(*slot.group, size_t(peer), *slot.region, slot.bulk_out(), slot.bulk_in(me), slot.bulk_bytes, data);
      e.wait(ack, 1, opt.timeout_ms);
      const double us = us_since(t0);
      if (rep == 0 || us < best_us) best_us = us;
    }
    e.flush(opt.timeout_ms);
    return double(slot.bulk_bytes) * opt.bw_iters * 8 / (best_us * 1e3);
  }

  // Waits for the peer's bulk writes, checks every byte, acknowledges. Empty or a mismatch text.
  std::string receive_bulk() {
    const uint32_t data = imm::encode(kBulk, uint32_t(peer));
    const uint32_t ack = imm::encode(kBulkAck, uint32_t(me));
    std::string bad;
    for (int rep = 0; rep < opt.bw_reps; ++rep) {
      e.wait(data, uint32_t(opt.bw_iters) * e.pieces_for(slot.bulk_bytes), opt.timeout_ms);
      if (bad.empty())
        bad = compare_pattern(slot.at(slot.bulk_in(peer)), slot.bulk_bytes, pair_seed(peer, me, slot.index));
      e.write(*slot.group, size_t(peer), *slot.region, slot.ack_out(), slot.ack_in(me), 8, ack);
    }
    return bad;
  }
};

}  // namespace

Share run_links(const Options& opt, SlotEngines& engines, const std::vector<RankInventory>& all) {
  Share share;
  if (engines.num_slots() == 0) return share;
  const int world = engines.slot(0).engine->world_size();
  const int me = engines.slot(0).engine->rank();
  const int rounds = num_rounds(world);
  for (int s = 0; s < engines.num_slots(); ++s) {
    SlotEngines::Slot& slot = engines.slot(s);
    for (int round = 0; round < rounds; ++round) {
      // Rounds start together: a pair stuck on a bad link until its deadline must not make the
      // next round's partners time out waiting for it (a healthy link reported as failed). The
      // barrier's deadline covers the slowest pair (a failed ping-pong, then a failed bulk wait);
      // a rank that is gone fails it at once, naming the rank.
      engines.slot(s).engine->bootstrap().barrier(opt.collective_timeout_ms());
      const int peer = round_partner(me, round, world);
      progress(me, "links: NIC slot %d, round %d of %d", s, round + 1, rounds);
      if (peer < 0) continue;
      const RankInventory& peer_inv = all[size_t(peer)];
      const std::string peer_problem = nic_problem(peer_inv, s);
      PairRun run{opt, slot, *slot.engine, me, peer, all[size_t(me)], peer_inv,
                  s < int(peer_inv.nics.size()) ? peer_inv.nics[size_t(s)] : ""};
      LinkResult out = run.blank();
      const std::string where = describe(all[size_t(me)], slot.nic) + " -> " + describe(peer_inv, run.peer_nic);
      // Both sides know from the inventory when one of them has no NIC here, so neither waits.
      if (!slot.problem.empty() || !peer_problem.empty()) {
        out.error = !slot.problem.empty() ? slot.problem : peer_problem;
        share.links.push_back(out);
        continue;
      }
      const char* step = "latency ping-pong";
      try {
        const std::vector<double> half = run.ping_pong();
        if (!half.empty()) {
          const tools::Percentiles p = tools::percentiles(half);
          out.latency_us_p50 = p.p50;
          out.latency_us_p99 = p.p99;
        }
        // The lower rank sends first, then receives; so the two directions never share the wire.
        double gbps = -1;
        std::string bad;
        if (me < peer) {
          step = "bandwidth send";
          gbps = run.send_bulk();
          step = "bandwidth receive";
          bad = run.receive_bulk();
        } else {
          step = "bandwidth receive";
          bad = run.receive_bulk();
          step = "bandwidth send";
          gbps = run.send_bulk();
        }
        out.gbps = gbps;
        out.ok = true;
        out.verified = true;
        // The bytes checked here are the ones the peer sent to us: report a mismatch on the
        // peer's outgoing link by naming it in ours too; rank 0 shows both.
        if (!bad.empty()) {
          out.ok = false;
          out.verified = false;
          out.error = "bytes from rank " + std::to_string(peer) + " to rank " + std::to_string(me) + ": " + bad;
        }
      } catch (const std::exception& ex) {
        out.ok = false;
        out.error = std::string(step) + " failed: " + ex.what();
        rank_failure(me, where + ": " + out.error);
      }
      share.links.push_back(out);
    }
  }
  return share;
}

static double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

void judge_links(const Options& opt, Report& report) {
  // A directed link's latency was measured by the lower rank of its pair; give the reverse
  // direction the same number.
  std::map<std::tuple<int, int, int>, double> lat50, lat99;
  for (const LinkResult& l : report.links)
    if (l.latency_us_p50 >= 0) {
      lat50[{l.slot, l.src, l.dst}] = l.latency_us_p50;
      lat99[{l.slot, l.src, l.dst}] = l.latency_us_p99;
    }
  for (LinkResult& l : report.links) {
    if (l.latency_us_p50 < 0 && lat50.count({l.slot, l.dst, l.src})) {
      l.latency_us_p50 = lat50[{l.slot, l.dst, l.src}];
      l.latency_us_p99 = lat99[{l.slot, l.dst, l.src}];
    }
  }
  // Intra-host links run through the kernel or shared memory, inter-host ones through the wire:
  // each kind is compared with its own median, over all NIC slots (the NICs of a cluster are
  // alike, and a whole rail running slow must stand out too).
  std::map<bool, std::vector<double>> kinds;
  for (const LinkResult& l : report.links)
    if (l.ok && l.gbps >= 0) kinds[l.src_host == l.dst_host].push_back(l.gbps);
  std::map<bool, double> medians;
  for (auto& [k, v] : kinds) medians[k] = median(v);

  if (report.links.empty()) {
    // Nothing measured is never a pass: either there is no pair, or no rank had a NIC to use.
    const bool alone = report.world_size <= 1;
    report.add(CheckResult{"links", "all pairs", alone ? Verdict::skip : Verdict::fail,
                           alone ? "a single rank has no pairs" : "no link measured: no rank has a NIC to use (see inventory)",
                           nlohmann::json::object()});
    return;
  }
  std::map<int, std::vector<const LinkResult*>> by_slot;
  for (LinkResult& l : report.links) {
    if (l.ok) {
      const double med = medians[l.src_host == l.dst_host];
      const bool below_floor = opt.min_gbps > 0 && l.gbps < opt.min_gbps;
      const bool outlier = opt.outlier_ratio > 0 && kinds[l.src_host == l.dst_host].size() >= 2 &&
                           l.gbps < opt.outlier_ratio * med;
      l.slow = below_floor || outlier;
    }
    by_slot[l.slot].push_back(&l);
  }
  for (const auto& [slot, links] : by_slot) {
    CheckResult c{"links", "NIC slot " + std::to_string(slot) + ": all pairs", Verdict::pass, "",
                  nlohmann::json::object()};
    int measured = 0, failed = 0, slow = 0;
    std::vector<double> gbps, lat;
    for (const LinkResult* l : links) {
      if (l->ok) {
        ++measured;
        gbps.push_back(l->gbps);
        if (l->latency_us_p50 >= 0) lat.push_back(l->latency_us_p50);
      } else {
        ++failed;
      }
      if (l->slow) ++slow;
      if (!l->ok || l->slow) {
        const double med = medians[l->src_host == l->dst_host];
        CheckResult bad{"links",
                        "rank " + std::to_string(l->src) + " -> rank " + std::to_string(l->dst) + " on " +
                            (l->src_nic.empty() ? "slot " + std::to_string(slot) : l->src_nic),
                        Verdict::fail, "", nlohmann::json::object()};
        const std::string who = "rank " + std::to_string(l->src) + " (" + l->src_host + ", " +
                                (l->src_nic.empty() ? "no NIC" : l->src_nic) + ") <-> rank " + std::to_string(l->dst) +
                                " (" + l->dst_host + ", " + (l->dst_nic.empty() ? "no NIC" : l->dst_nic) + ")";
        if (!l->ok) {
          bad.reason = who + ": " + l->error;
        } else {
          char buf[256];
          std::snprintf(buf, sizeof buf, ": slow link, %.3f Gb/s from rank %d to rank %d (median of %s links %.3f Gb/s",
                        l->gbps, l->src, l->dst, l->src_host == l->dst_host ? "intra-host" : "inter-host", med);
          bad.reason = who + buf;
          if (opt.min_gbps > 0) bad.reason += tools::format(", floor %.3f Gb/s", opt.min_gbps);
          bad.reason += tools::format(", outlier ratio %.2f)", opt.outlier_ratio);
        }
        bad.metrics = nlohmann::json{{"slot", slot}, {"src", l->src}, {"dst", l->dst}, {"src_host", l->src_host},
                                     {"dst_host", l->dst_host}, {"src_nic", l->src_nic}, {"dst_nic", l->dst_nic},
                                     {"gbps", l->gbps}, {"slow", l->slow}, {"ok", l->ok}};
        report.add(std::move(bad));
      }
    }
    c.metrics["links"] = int(links.size());
    c.metrics["measured"] = measured;
    c.metrics["failed"] = failed;
    c.metrics["slow"] = slow;
    if (!gbps.empty()) {
      c.metrics["gbps_median"] = median(gbps);
      c.metrics["gbps_min"] = *std::min_element(gbps.begin(), gbps.end());
      c.metrics["gbps_max"] = *std::max_element(gbps.begin(), gbps.end());
    }
    if (!lat.empty()) c.metrics["latency_us_median"] = median(lat);
    if (failed || slow) {
      c.verdict = Verdict::fail;
      c.reason = std::to_string(failed) + " failed and " + std::to_string(slow) + " slow of " +
                 std::to_string(links.size()) + " directed links (listed below)";
    }
    report.add(std::move(c));
  }
}

}  // namespace ferry::check
