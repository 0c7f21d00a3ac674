// The engine's worker and the ownership of the NICs. Callers publish write records into a lock-free
// ring (multi-producer) of pooled records with stable addresses; whoever holds the progress token
// posts them (a bounded number per step), polls the CQs, counts immediates and retires completed
// records. The hot path allocates nothing.
//
// One owner at a time. FI_THREAD_DOMAIN lets libfabric assume that one thread at a time calls into
// a domain and its endpoints and CQs; the progress token (an atomic flag taken with acquire and
// released with release ordering) is that one thread. A caller in write, wait or flush takes it when
// it is free and moves the engine itself: no hand-off to another thread, so a small write costs
// what the raw fi_writemsg and fi_cq_read cost. The worker thread takes it only when no caller has
// stepped for kHandOffUs: it is the owner of last resort, for writes in flight or arrivals when
// every caller is elsewhere (tcp and shm move a large write only while both ends poll), for imm
// callbacks (on_imm, set_flag_on_imm: they run on the worker) and for control tasks. Everything
// the token guards (next_post_, retire_scan_, in_flight_, each record's `done`) is touched only by
// its holder; the acquire/release pair orders one holder's writes before the next holder's reads.
// A record published while another thread holds the token is never stranded: the holder looks
// at the ring again after it lets go (Dekker-style fences on both sides) and posts what it finds.
#pragma once
#include <rdma/fabric.h>

#include <atomic>
#include <chrono>
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
  // them and posts them on the calling thread when no other thread holds the NICs. Blocks (moving
  // the engine, with backoff) while the ring is full; throws Status::timeout after timeout_ms.
  template <typename Fill>
  void enqueue(size_t count, int timeout_ms, Fill&& fill);

  // One progress step on the calling thread (post what is queued, poll the CQs) when the progress
  // token is free: returns 1 when it moved something, 0 when there was nothing to do, -1 when
  // another thread holds the token.
  int step_as_caller();
  // A caller that stops stepping (its wait turns to sleeping) hands the NICs to the worker.
  void hand_off();

  // Every record claimed so far has completed locally.
  void flush(int timeout_ms);
  // Like flush, but never throws: returns false when the deadline passed or a transport error
  // stopped the wait (teardown paths: a failed peer's writes never complete).
  bool drain(int timeout_ms) noexcept;

  // Runs `fn` on the worker thread (control path: registration shares the domain with the hot
  // path and FI_THREAD_DOMAIN needs one caller) and waits for it; rethrows what it throws.
  void run_on_worker(const std::function<void()>& fn, int timeout_ms);

  void add_imm_waiter(uint32_t imm, uint32_t count, std::function<void()> fn);

  // Held by a caller blocked in wait/flush: while it sleeps rather than steps, its arrivals need
  // the worker polling, so the worker counts as attended (no long sleeps) while any exists.
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

  bool try_acquire();
  // Lets go of the token, then posts what was published meanwhile (see the header comment).
  void release();
  // Post and poll under the token.
  bool step();
  // A record is published but not posted yet (readable without the token).
  bool queued() const;
  // The worker blocks until wake() or timeout_us; `deep`: nothing is attended (callers waking
  // the engine from idle wake it).
  void park(int timeout_us, bool deep);
  void wake_if_parked_deep();
  // Something for the worker alone: control tasks, imm callbacks, stop.
  bool worker_work_pending() const;

  std::vector<std::unique_ptr<fabric::Nic>>& nics_;
  ImmCounter& counter_;
  const int rank_;
  const int max_posts_per_step_;

  std::unique_ptr<WriteOp[]> ring_;
  const size_t capacity_;
  const uint64_t mask_;
  alignas(64) std::atomic<uint64_t> tail_{0};      // next seq to claim (producers)
  alignas(64) std::atomic<uint64_t> retired_{0};   // every seq below has completed (token holder)
  alignas(64) std::atomic<bool> token_{false};     // the progress token: held while calling libfabric
  std::atomic<int64_t> last_caller_step_ns_{0};    // steady clock of the last step a caller made
  alignas(64) uint64_t next_post_ = 0;             // token holder only
  std::atomic<uint64_t> next_post_seen_{0};        // next_post_ for readers without the token
  uint64_t retire_scan_ = 0;                       // token holder only
  size_t in_flight_[kMaxNics] = {};                // token holder only: posted, not completed, per NIC
  std::atomic<size_t> in_flight_total_{0};         // written by the token holder, read by anyone

  std::atomic<bool> stop_{false};
  std::atomic<int> active_waiters_{0};
  std::atomic<uint32_t> wake_word_{0};             // futex: bumped by wake()
  std::atomic<int> parked_{0};                     // 0 running, 1 parked while callers step, 2 idle
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
  // Chunks of half the ring let a large scatter stream through while it is posted.
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
    // Pairs with the fence in release(): either this thread gets the token below, or its holder
    // sees these records after letting go.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    step_as_caller();
    count -= n;
  }
}

}  // namespace ferry::te
