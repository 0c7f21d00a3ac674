// The engine's worker: one thread owning every NIC of the engine. Callers publish write records
// into a lock-free ring (multi-producer, one consumer) of pooled records with stable addresses; the
// worker posts them (a bounded number per step), polls the CQs, counts immediates, fires imm
// callbacks and retires completed records. The hot path allocates nothing.
#pragma once
#include <rdma/fabric.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "transfer_engine/engine.h"
#include "transfer_engine/fabric/nic.h"
#include "transfer_engine/imm_counter.h"

namespace ferry::te {

// One fi_writemsg. `context` comes first so a completion's op_context is the record's address.
struct WriteOp {
  fi_context2 context;
  std::atomic<uint64_t> published{0};  // seq + 1 once the producer filled it
  const void* buf = nullptr;
  void* desc = nullptr;
  uint64_t bytes = 0;
  uint64_t remote_addr = 0;
  uint64_t key = 0;
  fi_addr_t dest = FI_ADDR_UNSPEC;
  uint32_t imm = 0;
  int32_t peer_rank = -1;
  uint16_t nic = 0;
  bool has_imm = false;
  bool done = false;  // worker-only
};

class Worker {
 public:
  Worker(std::vector<std::unique_ptr<fabric::Nic>>& nics, ImmCounter& counter, int rank,
         int max_posts_per_step, size_t ring_capacity = 8192);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // `on_start` runs first on the worker thread (CPU pinning).
  void start(std::function<void()> on_start);
  void stop();

  // Claims `count` records in order and calls fill(WriteOp&) on each, in order, then publishes
  // them. Blocks (with backoff) while the ring is full; throws Status::timeout after timeout_ms.
  template <typename Fill>
  void enqueue(size_t count, int timeout_ms, Fill&& fill);

  // Every record claimed so far has completed locally.
  void flush(int timeout_ms);
  // Like flush, but never throws: returns false when the deadline passed or a transport error
  // stopped the wait (teardown paths: a failed peer's writes never complete).
  bool drain(int timeout_ms) noexcept;

  // Runs `fn` on the worker thread (control path: registration shares the domain with the hot
  // path and FI_THREAD_DOMAIN needs one caller) and waits for it; rethrows what it throws.
  void run_on_worker(const std::function<void()>& fn, int timeout_ms);

  void add_imm_waiter(uint32_t imm, uint32_t count, std::function<void()> fn);

  // Held by a caller blocked in wait/flush: its arrivals need the worker polling, so the worker
  // keeps its idle sleeps short while any exists (and is woken when the first arrives).
  class WaitScope {
   public:
    explicit WaitScope(Worker& worker);
    ~WaitScope();
    WaitScope(const WaitScope&) = delete;
    WaitScope& operator=(const WaitScope&) = delete;

   private:
    Worker& worker_;
  };

  // Throws the first transport error the worker saw (sticky: the engine's transport is suspect
  // once a write failed).
  void raise_if_failed() const;

  EngineStats stats() const;

  // "; 3 writes not yet completed, the oldest to rank 5 on NIC 0" or "" (for timeout messages: a
  // peer that died keeps its writes from completing).
  std::string in_flight_summary() const;

 private:
  struct ImmWaiter {
    uint32_t imm;
    uint32_t count;
    std::function<void()> fn;
  };

  void loop();
  bool poll_cqs();
  bool post_some();
  bool run_control();
  void fire_waiters();
  void retire();
  void fail(Status status, const std::string& text);
  void wake();
  uint64_t claim(size_t count, int timeout_ms);
  WriteOp& slot(uint64_t seq) { return ring_[seq & mask_]; }

  std::vector<std::unique_ptr<fabric::Nic>>& nics_;
  ImmCounter& counter_;
  const int rank_;
  const int max_posts_per_step_;

  std::unique_ptr<WriteOp[]> ring_;
  const size_t capacity_;
  const uint64_t mask_;
  alignas(64) std::atomic<uint64_t> tail_{0};      // next seq to claim (producers)
  alignas(64) std::atomic<uint64_t> retired_{0};   // every seq below has completed (worker)
  alignas(64) uint64_t next_post_ = 0;             // worker-only
  uint64_t retire_scan_ = 0;                       // worker-only
  size_t in_flight_[kMaxNics] = {};                // worker-only: posted, not completed, per NIC
  size_t in_flight_total_ = 0;                     // worker-only

  std::atomic<bool> stop_{false};
  std::atomic<int> active_waiters_{0};
  std::atomic<bool> sleeping_{false};
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::thread thread_;

  struct ControlTask {
    const void* token;
    std::function<void()> run;
  };
  std::mutex control_mutex_;
  std::deque<ControlTask> control_;
  std::atomic<bool> has_control_{false};

  std::mutex waiter_mutex_;
  std::vector<ImmWaiter> waiters_;
  std::atomic<bool> waiters_dirty_{false};
  std::atomic<size_t> num_waiters_{0};

  mutable std::mutex error_mutex_;
  std::atomic<bool> failed_{false};
  Status error_status_ = Status::ok;
  std::string error_text_;

  std::atomic<uint64_t> ops_posted_{0};
  std::atomic<uint64_t> bytes_posted_{0};
  std::atomic<uint64_t> eagain_retries_{0};
  std::atomic<uint64_t> imms_received_{0};
  std::atomic<uint64_t> bytes_per_nic_[kMaxNics] = {};
};

template <typename Fill>
void Worker::enqueue(size_t count, int timeout_ms, Fill&& fill) {
  // Chunks of half the ring let a large scatter stream through while the worker drains it.
  const size_t chunk = capacity_ / 2;
  while (count > 0) {
    const size_t n = count < chunk ? count : chunk;
    const uint64_t first = claim(n, timeout_ms);
    for (size_t i = 0; i < n; ++i) {
      WriteOp& op = slot(first + i);
      op.done = false;
      fill(op);
      op.published.store(first + i + 1, std::memory_order_release);
    }
    count -= n;
  }
  if (sleeping_.load(std::memory_order_acquire)) wake();
}

}  // namespace ferry::te
