// Arrivals per 32-bit immediate, independent of delivery order (EFA's SRD is unordered): the worker
// adds, waiters read and consume. Lock-free open addressing; keys are never removed, so a table
// holds as many distinct immediates as its capacity over the engine's lifetime.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "transfer_engine/engine.h"

namespace ferry::te {

class ImmCounter {
 public:
  explicit ImmCounter(size_t capacity = size_t{1} << 15);  // rounded up to a power of two

  // Adds `n` arrivals of `imm`; false when the table is full (the caller reports it).
  bool add(uint32_t imm, uint32_t n = 1);
  // Arrivals not yet consumed.
  uint32_t count(uint32_t imm) const;
  // Consumes `n` arrivals if at least `n` are there, atomically; false otherwise.
  bool try_consume(uint32_t imm, uint32_t n);
  // Consumes every expectation at once when all are met (waiters of disjoint immediates never
  // steal from each other); false and nothing consumed otherwise.
  bool try_consume_all(std::span<const ImmExpect> expects);
  size_t capacity() const { return mask_ + 1; }

  // Waiters past their spin phase block here until `imm` has `target` arrivals (add() wakes them
  // then, and only then: a waiter woken by every arrival took the core from the worker feeding it
  // once per completion batch), wake_all(), or timeout_us. `seen` is arrival_epoch() read before
  // the waiter last looked at the counts, so nothing that happened since is slept through. When
  // every watch slot is taken, the sleeper is woken by each notify_arrivals() instead.
  uint32_t arrival_epoch() const { return epoch_.load(std::memory_order_seq_cst); }
  void sleep_until_arrival(uint32_t seen, int timeout_us, uint32_t imm, uint32_t target) const;
  // After each CQ batch that brought immediates (a syscall only for sleepers without a watch).
  void notify_arrivals();
  // Wakes every sleeper (a transport failure they must notice before their deadline).
  void wake_all() const;

 private:
  struct alignas(16) Slot {
    std::atomic<uint64_t> key{0};  // 0: empty; else (1 << 32) | imm
    std::atomic<uint32_t> count{0};
  };
  Slot* find(uint32_t imm) const;
  Slot* find_or_insert(uint32_t imm);

  std::unique_ptr<Slot[]> slots_;
  size_t mask_;
  void wake(uint32_t imm, uint32_t count) const;

  static constexpr int kWatches = 16;
  mutable std::atomic<uint32_t> epoch_{0};
  mutable std::atomic<uint64_t> watches_[kWatches] = {};  // 0: free; else (imm << 32) | target
  mutable std::atomic<uint32_t> watching_{0};
  mutable std::atomic<uint32_t> unwatched_sleepers_{0};
};

// "ranks 5, 9: imm 0x12345 (tag 18, from rank 5): 2 of 3 missing; ...": the senders still short
// (the first few named, the rest counted), then the first few unmet immediates.
std::string describe_missing(const ImmCounter& counter, std::span<const ImmExpect> expects);

// Waits (spin, then yield, then short sleeps) until every expectation is met and consumes them.
// `check` runs between polls and may throw (a transport error seen by the worker). On deadline
// throws Status::timeout "<what>: timed out after N ms waiting for <describe_missing>".
void wait_for_imms(const ImmCounter& counter, std::span<const ImmExpect> expects, int timeout_ms,
                   const std::string& what, const std::function<void()>& check);

// Idle backoff shared by the worker and waiters, by time since the last progress: spin briefly
// (latency), then yield (other threads of a busy job get the core), then sleep in growing steps up
// to max_sleep_us (tests run dozens of engines on two cores).
class Backoff {
 public:
  explicit Backoff(int max_sleep_us = 200, int spin_us = 20, int yield_us = 2000)
      : max_sleep_us_(max_sleep_us), spin_us_(spin_us), yield_us_(yield_us) {}
  void reset() { idle_since_ns_ = 0; }
  void pause();
  // Past the yield phase: the caller may block (with a timeout) instead of pausing.
  bool sleeping() const;
  // The next sleep step in microseconds (grows with idle time).
  int sleep_us() const;

 private:
  int64_t idle_ns() const;
  int64_t idle_since_ns_ = 0;
  int max_sleep_us_, spin_us_, yield_us_;
};

}  // namespace ferry::te
