#include "transfer_engine/imm_counter.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <thread>
#include <unordered_set>
#include <vector>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "transfer_engine/ranks.h"

namespace ferry::te {
namespace {

constexpr uint64_t kOccupied = uint64_t{1} << 32;
constexpr int64_t kWaiterSleepUs = 2000;

uint64_t slot_key(uint32_t imm) { return kOccupied | imm; }

size_t hash(uint32_t imm) {
  // Immediates differ mostly in their low (rank) bits and in a few tag bits; mix them all.
  uint64_t x = imm * 0x9E3779B97F4A7C15ull;
  return static_cast<size_t>(x >> 29);
}

void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

}  // namespace

ImmCounter::ImmCounter(size_t capacity)
    : slots_(new Slot[std::bit_ceil(std::max<size_t>(capacity, 16))]),
      mask_(std::bit_ceil(std::max<size_t>(capacity, 16)) - 1) {}

ImmCounter::Slot* ImmCounter::find(uint32_t imm) const {
  const uint64_t key = slot_key(imm);
  for (size_t i = hash(imm), probes = 0; probes <= mask_; ++i, ++probes) {
    Slot& slot = slots_[i & mask_];
    uint64_t k = slot.key.load(std::memory_order_acquire);
    if (k == key) return &slot;
    if (k == 0) return nullptr;
  }
  return nullptr;
}

ImmCounter::Slot* ImmCounter::find_or_insert(uint32_t imm) {
  const uint64_t key = slot_key(imm);
  for (size_t i = hash(imm), probes = 0; probes <= mask_; ++i, ++probes) {
    Slot& slot = slots_[i & mask_];
    uint64_t k = slot.key.load(std::memory_order_acquire);
    if (k == 0) {
      uint64_t expected = 0;
      if (slot.key.compare_exchange_strong(expected, key, std::memory_order_acq_rel)) return &slot;
      k = expected;
    }
    if (k == key) return &slot;
  }
  return nullptr;
}

bool ImmCounter::add(uint32_t imm, uint32_t n) {
  Slot* slot = find_or_insert(imm);
  if (slot == nullptr) return false;
  const uint32_t now = slot->count.fetch_add(n, std::memory_order_seq_cst) + n;
  if (watching_.load(std::memory_order_seq_cst) != 0) wake(imm, now);
  return true;
}

void ImmCounter::wake(uint32_t imm, uint32_t count) const {
  for (const auto& watch : watches_) {
    const uint64_t w = watch.load(std::memory_order_seq_cst);
    if (w != 0 && uint32_t(w >> 32) == imm && count >= uint32_t(w)) {
      wake_all();
      return;
    }
  }
}

uint32_t ImmCounter::count(uint32_t imm) const {
  const Slot* slot = find(imm);
  return slot ? slot->count.load(std::memory_order_acquire) : 0;
}

bool ImmCounter::try_consume(uint32_t imm, uint32_t n) {
  if (n == 0) return true;
  Slot* slot = find(imm);
  if (slot == nullptr) return false;
  uint32_t have = slot->count.load(std::memory_order_acquire);
  while (have >= n) {
    if (slot->count.compare_exchange_weak(have, have - n, std::memory_order_acq_rel)) return true;
  }
  return false;
}

bool ImmCounter::try_consume_all(std::span<const ImmExpect> expects) {
  for (const ImmExpect& e : expects) {
    if (count(e.imm) < e.count) return false;
  }
  // Consume one by one; a concurrent consumer of the same immediate can make a later one fail, in
  // which case the earlier ones are given back.
  for (size_t i = 0; i < expects.size(); ++i) {
    if (!try_consume(expects[i].imm, expects[i].count)) {
      for (size_t j = 0; j < i; ++j) add(expects[j].imm, expects[j].count);
      return false;
    }
  }
  return true;
}

std::string describe_missing(const ImmCounter& counter, std::span<const ImmExpect> expects) {
  // The senders first, bounded (a wait at world 2^20 may miss every rank), then the first few
  // immediates in detail.
  constexpr size_t kDetailed = 8;
  std::vector<int> senders;
  std::unordered_set<int> seen;
  std::string detail;
  size_t unmet = 0;
  for (const ImmExpect& e : expects) {
    uint32_t have = counter.count(e.imm);
    if (have >= e.count) continue;
    ++unmet;
    const int sender = static_cast<int>(imm::sender(e.imm));
    if (seen.insert(sender).second) senders.push_back(sender);
    if (unmet > kDetailed) continue;
    if (!detail.empty()) detail += "; ";
    char hex[16];
    snprintf(hex, sizeof(hex), "0x%x", e.imm);
    detail += "imm " + std::string(hex) + " (tag " + std::to_string(imm::tag(e.imm)) +
              ", from rank " + std::to_string(sender) + "): " + std::to_string(e.count - have) +
              " of " + std::to_string(e.count) + " missing";
  }
  if (unmet > kDetailed) detail += "; and " + std::to_string(unmet - kDetailed) + " more";
  return describe_ranks(senders) + ": " + detail;
}

void wait_for_imms(const ImmCounter& counter, std::span<const ImmExpect> expects, int timeout_ms,
                   const std::string& what, const std::function<void()>& check) {
  auto& mutable_counter = const_cast<ImmCounter&>(counter);
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + std::chrono::milliseconds(timeout_ms);
  Backoff backoff(1000);
  for (;;) {
    const uint32_t epoch = counter.arrival_epoch();
    if (mutable_counter.try_consume_all(expects)) return;
    if (check) check();
    if (std::chrono::steady_clock::now() >= deadline) {
      // One last look: the arrivals may have landed while the check ran.
      if (mutable_counter.try_consume_all(expects)) return;
      raise(Status::timeout, what + ": timed out after " + std::to_string(timeout_ms) +
                                 " ms waiting for " + describe_missing(counter, expects));
    }
    if (backoff.sleeping()) {
      // Woken when the first unmet expectation is met or the worker fails; the timeout only
      // bounds how late the deadline is noticed.
      const auto left = std::chrono::duration_cast<std::chrono::microseconds>(deadline - std::chrono::steady_clock::now());
      const int sleep_us = static_cast<int>(std::clamp<int64_t>(left.count() + 1, 1, kWaiterSleepUs));
      for (const ImmExpect& e : expects) {
        if (counter.count(e.imm) < e.count) {
          counter.sleep_until_arrival(epoch, sleep_us, e.imm, e.count);
          break;
        }
      }
    } else {
      backoff.pause();
    }
  }
}

int64_t Backoff::idle_ns() const {
  return std::chrono::steady_clock::now().time_since_epoch().count() - idle_since_ns_;
}

void Backoff::pause() {
  if (idle_since_ns_ == 0) {
    idle_since_ns_ = std::chrono::steady_clock::now().time_since_epoch().count();
    return;
  }
  const int64_t idle = idle_ns();
  if (idle < int64_t{spin_us_} * 1000) {
    // Spin, but give the core away between rounds: with more runnable threads than cores (ranks
    // and their workers on a small host) a pure spin holds the core the worker or peer this
    // thread waits for needs. Uncontended, a yield returns at once.
    for (int i = 0; i < 16; ++i) cpu_relax();
    std::this_thread::yield();
  } else if (idle < int64_t{yield_us_} * 1000) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(sleep_us()));
  }
}

bool Backoff::sleeping() const {
  return idle_since_ns_ != 0 && idle_ns() >= int64_t{yield_us_} * 1000;
}

int Backoff::sleep_us() const {
  // 10 us right after the yield phase, doubling every 10 ms of further idleness.
  const int64_t beyond_ms = std::max<int64_t>(0, idle_ns() / 1000000 - yield_us_ / 1000);
  return static_cast<int>(std::min<int64_t>(max_sleep_us_, int64_t{10} << std::min<int64_t>(beyond_ms / 10, 8)));
}

void ImmCounter::sleep_until_arrival(uint32_t seen, int timeout_us, uint32_t imm, uint32_t target) const {
  // Claim a watch, then look once more: add() bumps the count before it reads the watches, this
  // claims before it reads the count (all sequentially consistent), so one of them sees the other.
  const uint64_t key = (uint64_t{imm} << 32) | target;
  std::atomic<uint64_t>* watch = nullptr;
  for (auto& w : watches_) {
    uint64_t free = 0;
    if (w.compare_exchange_strong(free, key, std::memory_order_seq_cst)) {
      watch = &w;
      break;
    }
  }
  if (watch != nullptr) {
    watching_.fetch_add(1, std::memory_order_seq_cst);
  } else {
    unwatched_sleepers_.fetch_add(1, std::memory_order_seq_cst);
  }
  if (count(imm) < target) {
    timespec timeout{timeout_us / 1000000, static_cast<long>(timeout_us % 1000000) * 1000};
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&epoch_), FUTEX_WAIT_PRIVATE, seen, &timeout, nullptr, 0);
  }
  if (watch != nullptr) {
    watch->store(0, std::memory_order_seq_cst);
    watching_.fetch_sub(1, std::memory_order_seq_cst);
  } else {
    unwatched_sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  }
}

void ImmCounter::notify_arrivals() {
  if (unwatched_sleepers_.load(std::memory_order_seq_cst) != 0) wake_all();
}

void ImmCounter::wake_all() const {
  epoch_.fetch_add(1, std::memory_order_seq_cst);
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&epoch_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
}

}  // namespace ferry::te
