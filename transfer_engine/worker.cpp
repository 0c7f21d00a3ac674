#include "transfer_engine/worker.h"

#include <bit>
#include <future>

namespace ferry::te {
namespace {

constexpr size_t kCqBatch = 32;

bool is_peer_failure(int err) {
  switch (err) {
    case FI_ECONNREFUSED:
    case FI_ECONNRESET:
    case FI_ECONNABORTED:
    case FI_EHOSTUNREACH:
    case FI_ENOTCONN:
    case FI_ESHUTDOWN:
    case FI_EIO:
      return true;
    default:
      return false;
  }
}

}  // namespace

Worker::Worker(std::vector<std::unique_ptr<fabric::Nic>>& nics, ImmCounter& counter, int rank,
               int max_posts_per_step, size_t ring_capacity)
    : nics_(nics),
      counter_(counter),
      rank_(rank),
      max_posts_per_step_(max_posts_per_step),
      ring_(new WriteOp[std::bit_ceil(ring_capacity)]),
      capacity_(std::bit_ceil(ring_capacity)),
      mask_(std::bit_ceil(ring_capacity) - 1) {}

Worker::~Worker() { stop(); }

void Worker::start(std::function<void()> on_start) {
  thread_ = std::thread([this, on_start = std::move(on_start)] {
    if (on_start) on_start();
    loop();
  });
}

void Worker::stop() {
  if (!thread_.joinable()) return;
  stop_.store(true, std::memory_order_release);
  wake();
  thread_.join();
}

void Worker::wake() {
  std::lock_guard<std::mutex> lock(sleep_mutex_);
  sleep_cv_.notify_one();
}

uint64_t Worker::claim(size_t count, int timeout_ms) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  Backoff backoff(50);
  uint64_t tail = tail_.load(std::memory_order_relaxed);
  for (;;) {
    // Slots [tail, tail + count) are free once everything up to tail + count - capacity retired;
    // claiming only then means a producer never holds a slot it cannot fill.
    if (tail + count <= retired_.load(std::memory_order_acquire) + capacity_) {
      if (tail_.compare_exchange_weak(tail, tail + count, std::memory_order_acq_rel)) return tail;
      continue;
    }
    raise_if_failed();
    if (std::chrono::steady_clock::now() >= deadline) {
      raise(Status::timeout, "rank " + std::to_string(rank_) + ": operation queue full for " +
                                 std::to_string(timeout_ms) + " ms (" + std::to_string(capacity_) +
                                 " records)" + in_flight_summary());
    }
    if (sleeping_.load(std::memory_order_acquire)) wake();
    backoff.pause();
    tail = tail_.load(std::memory_order_relaxed);
  }
}

void Worker::flush(int timeout_ms) {
  WaitScope scope(*this);
  const uint64_t target = tail_.load(std::memory_order_acquire);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  Backoff backoff(100);
  while (retired_.load(std::memory_order_acquire) < target) {
    raise_if_failed();
    if (std::chrono::steady_clock::now() >= deadline) {
      const uint64_t retired = retired_.load(std::memory_order_acquire);
      const WriteOp& oldest = ring_[retired & mask_];
      raise(Status::timeout,
            "rank " + std::to_string(rank_) + ": flush timed out after " +
                std::to_string(timeout_ms) + " ms with " + std::to_string(target - retired) +
                " writes not completed; the oldest goes to rank " +
                std::to_string(oldest.peer_rank) + " on NIC " + std::to_string(oldest.nic));
    }
    backoff.pause();
  }
  raise_if_failed();
}

bool Worker::drain(int timeout_ms) noexcept {
  WaitScope scope(*this);
  const uint64_t target = tail_.load(std::memory_order_acquire);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  Backoff backoff(100);
  while (retired_.load(std::memory_order_acquire) < target) {
    if (failed_.load(std::memory_order_acquire) || std::chrono::steady_clock::now() >= deadline)
      return false;
    backoff.pause();
  }
  return true;
}

void Worker::run_on_worker(const std::function<void()>& fn, int timeout_ms) {
  if (!thread_.joinable()) {
    fn();
    return;
  }
  auto task = std::make_shared<std::packaged_task<void()>>(fn);
  std::future<void> done = task->get_future();
  const void* token = task.get();
  {
    std::lock_guard<std::mutex> lock(control_mutex_);
    control_.push_back(ControlTask{token, [task] { (*task)(); }});
    has_control_.store(true, std::memory_order_release);
  }
  wake();
  if (done.wait_for(std::chrono::milliseconds(timeout_ms)) != std::future_status::ready) {
    // `fn` refers to the caller's frame: it may be abandoned only if the worker has not taken it.
    std::lock_guard<std::mutex> lock(control_mutex_);
    for (auto it = control_.begin(); it != control_.end(); ++it) {
      if (it->token == token) {
        control_.erase(it);
        raise(Status::timeout, "rank " + std::to_string(rank_) +
                                   ": the worker did not take a control operation (registration) "
                                   "within " + std::to_string(timeout_ms) + " ms");
      }
    }
  }
  done.get();  // taken: it is running or ran; rethrows what it threw
}

Worker::WaitScope::WaitScope(Worker& worker) : worker_(worker) {
  if (worker_.active_waiters_.fetch_add(1, std::memory_order_acq_rel) == 0 &&
      worker_.sleeping_.load(std::memory_order_acquire)) {
    worker_.wake();
  }
}

Worker::WaitScope::~WaitScope() { worker_.active_waiters_.fetch_sub(1, std::memory_order_acq_rel); }

void Worker::add_imm_waiter(uint32_t imm, uint32_t count, std::function<void()> fn) {
  {
    std::lock_guard<std::mutex> lock(waiter_mutex_);
    waiters_.push_back(ImmWaiter{imm, count, std::move(fn)});
    num_waiters_.store(waiters_.size(), std::memory_order_release);
  }
  waiters_dirty_.store(true, std::memory_order_release);
  wake();
}

void Worker::raise_if_failed() const {
  if (!failed_.load(std::memory_order_acquire)) return;
  std::lock_guard<std::mutex> lock(error_mutex_);
  raise(error_status_, error_text_);
}

EngineStats Worker::stats() const {
  EngineStats s;
  s.writes_posted = ops_posted_.load(std::memory_order_relaxed);
  s.bytes_posted = bytes_posted_.load(std::memory_order_relaxed);
  s.eagain_retries = eagain_retries_.load(std::memory_order_relaxed);
  s.imms_received = imms_received_.load(std::memory_order_relaxed);
  for (int n = 0; n < kMaxNics; ++n)
    s.bytes_posted_per_nic[n] = bytes_per_nic_[n].load(std::memory_order_relaxed);
  return s;
}

std::string Worker::in_flight_summary() const {
  const uint64_t retired = retired_.load(std::memory_order_acquire);
  const uint64_t tail = tail_.load(std::memory_order_acquire);
  if (tail == retired) return "";
  std::string text = "; " + std::to_string(tail - retired) + " writes not yet completed";
  const WriteOp& oldest = ring_[retired & mask_];
  if (oldest.published.load(std::memory_order_acquire) == retired + 1) {
    text += ", the oldest to rank " + std::to_string(oldest.peer_rank) + " on NIC " +
            std::to_string(oldest.nic);
  }
  return text;
}

void Worker::fail(Status status, const std::string& text) {
  {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (failed_.load(std::memory_order_relaxed)) return;  // the first error is the cause
    error_status_ = status;
    error_text_ = text;
    failed_.store(true, std::memory_order_release);
  }
  counter_.wake_all();  // sleeping waiters report it now, not at their next timeout
}

void Worker::loop() {
  // Idle sleeps grow to 1 ms so that dozens of idle engines on a few cores cost little.
  Backoff backoff(1000);
  while (!stop_.load(std::memory_order_acquire)) {
    bool busy = poll_cqs();
    if (has_control_.load(std::memory_order_acquire)) busy |= run_control();
    busy |= post_some();
    if (num_waiters_.load(std::memory_order_acquire) != 0 &&
        (busy || waiters_dirty_.exchange(false, std::memory_order_acq_rel))) {
      fire_waiters();
    }
    if (busy) {
      backoff.reset();
      continue;
    }
    // Attended: writes in flight, a caller blocked in wait/flush, or registered imm callbacks.
    // tcp and shm move bytes of a large write only when both ends poll, so an attended worker
    // never sleeps; it yields, which costs little when many ranks share a core.
    const bool attended = in_flight_total_ != 0 ||
                          active_waiters_.load(std::memory_order_acquire) != 0 ||
                          num_waiters_.load(std::memory_order_acquire) != 0;
    if (!backoff.sleeping()) {
      backoff.pause();
    } else if (attended) {
      std::this_thread::yield();
    } else {
      // Producers notify when they see the worker asleep; the timeout keeps CQs progressing for
      // arrivals nobody waits for yet.
      std::unique_lock<std::mutex> lock(sleep_mutex_);
      sleeping_.store(true, std::memory_order_seq_cst);
      if (!stop_.load(std::memory_order_acquire) && !has_control_.load(std::memory_order_acquire) &&
          active_waiters_.load(std::memory_order_acquire) == 0 &&
          slot(next_post_).published.load(std::memory_order_acquire) != next_post_ + 1) {
        sleep_cv_.wait_for(lock, std::chrono::microseconds(backoff.sleep_us()));
      }
      sleeping_.store(false, std::memory_order_release);
    }
  }
  // Control tasks queued while stopping still run, so no caller is left waiting on them.
  run_control();
}

bool Worker::run_control() {
  std::deque<ControlTask> tasks;
  {
    std::lock_guard<std::mutex> lock(control_mutex_);
    tasks.swap(control_);
    has_control_.store(false, std::memory_order_release);
  }
  for (auto& task : tasks) task.run();
  return !tasks.empty();
}

bool Worker::poll_cqs() {
  fi_cq_data_entry entries[kCqBatch];
  bool any = false;
  bool any_imm = false;
  for (size_t n = 0; n < nics_.size(); ++n) {
    fabric::Nic& nic = *nics_[n];
    for (int rounds = 0; rounds < 4; ++rounds) {
      ssize_t got = nic.poll(entries, kCqBatch);
      if (got == -FI_EAVAIL) {
        fi_cq_err_entry err{};
        std::string text;
        if (nic.read_error(err, text)) {
          any = true;
          auto* op = static_cast<WriteOp*>(err.op_context);
          std::string peer = "an unknown peer";
          if (op != nullptr && op >= ring_.get() && op < ring_.get() + capacity_) {
            op->done = true;
            if (in_flight_[n] > 0) {
            --in_flight_[n];
            --in_flight_total_;
          }
            peer = "rank " + std::to_string(op->peer_rank);
          }
          fail(is_peer_failure(err.err) ? Status::peer_failed : Status::transport,
               "rank " + std::to_string(rank_) + ": write to " + peer + " on NIC " +
                   std::to_string(n) + " (" + nic.domain_name() + ", " + nic.provider_name() +
                   ") failed: " + text);
        }
        continue;
      }
      if (got < 0) {
        fail(Status::transport, "rank " + std::to_string(rank_) + " NIC " + std::to_string(n) +
                                    ": " + fabric::fi_error_text("fi_cq_read", static_cast<int>(got)));
        break;
      }
      if (got == 0) break;
      any = true;
      for (ssize_t i = 0; i < got; ++i) {
        const fi_cq_data_entry& e = entries[i];
        if (e.flags & FI_REMOTE_CQ_DATA) {
          // Only the low 32 bits: EFA delivers no more, so nothing may depend on them.
          const uint32_t imm = static_cast<uint32_t>(e.data);
          // Counted first: a waiter released by this arrival may read the stats at once.
          imms_received_.store(imms_received_.load(std::memory_order_relaxed) + 1,
                               std::memory_order_relaxed);
          if (!counter_.add(imm)) {
            fail(Status::internal, "rank " + std::to_string(rank_) + ": immediate table full (" +
                                       std::to_string(counter_.capacity()) +
                                       " distinct immediates); reuse tags across steps");
          }
          any_imm = true;
        } else if (e.op_context != nullptr) {
          static_cast<WriteOp*>(e.op_context)->done = true;
          if (in_flight_[n] > 0) {
            --in_flight_[n];
            --in_flight_total_;
          }
        }
      }
      if (static_cast<size_t>(got) < kCqBatch) break;
    }
  }
  if (any) retire();
  if (any_imm) {
    waiters_dirty_.store(true, std::memory_order_relaxed);
    counter_.notify_arrivals();
  }
  return any;
}

void Worker::retire() {
  uint64_t r = retire_scan_;
  while (r < next_post_ && ring_[r & mask_].done) ++r;
  if (r != retire_scan_) {
    retire_scan_ = r;
    retired_.store(r, std::memory_order_release);
  }
}

bool Worker::post_some() {
  int attempts = 0;
  bool any = false;
  while (attempts < max_posts_per_step_) {
    WriteOp& op = slot(next_post_);
    if (op.published.load(std::memory_order_acquire) != next_post_ + 1) break;
    ++attempts;
    // FI_MORE only when the next post is known to go to the same NIC within this step and the
    // queue has room for it, so no doorbell is left pending when the step ends or a post fails.
    const WriteOp& next = slot(next_post_ + 1);
    const bool more = attempts < max_posts_per_step_ &&
                      next.published.load(std::memory_order_acquire) == next_post_ + 2 &&
                      next.nic == op.nic &&
                      in_flight_[op.nic] + 2 < nics_[op.nic]->caps().tx_size;
    ssize_t rc = nics_[op.nic]->post_write(op.buf, op.bytes, op.desc, op.dest, op.remote_addr,
                                           op.key, op.has_imm ? &op.imm : nullptr, &op.context,
                                           more);
    if (rc == -FI_EAGAIN) {
      // The provider's queue is full: make room by reaping completions, then retry.
      eagain_retries_.store(eagain_retries_.load(std::memory_order_relaxed) + 1,
                            std::memory_order_relaxed);
      poll_cqs();
      continue;
    }
    any = true;
    ++next_post_;
    if (rc != 0) {
      op.done = true;
      fail(Status::transport, "rank " + std::to_string(rank_) + ": posting a write of " +
                                  std::to_string(op.bytes) + " bytes to rank " +
                                  std::to_string(op.peer_rank) + " on NIC " +
                                  std::to_string(op.nic) + " (" + nics_[op.nic]->domain_name() +
                                  "): " + fabric::fi_error_text("fi_writemsg", static_cast<int>(rc)));
      retire();
      continue;
    }
    ++in_flight_[op.nic];
    ++in_flight_total_;
    ops_posted_.store(ops_posted_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    bytes_posted_.store(bytes_posted_.load(std::memory_order_relaxed) + op.bytes,
                        std::memory_order_relaxed);
    std::atomic<uint64_t>& nic_bytes = bytes_per_nic_[op.nic];
    nic_bytes.store(nic_bytes.load(std::memory_order_relaxed) + op.bytes, std::memory_order_relaxed);
  }
  return any || attempts > 0;
}

void Worker::fire_waiters() {
  std::vector<std::function<void()>> ready;
  {
    std::lock_guard<std::mutex> lock(waiter_mutex_);
    for (size_t i = 0; i < waiters_.size();) {
      if (counter_.try_consume(waiters_[i].imm, waiters_[i].count)) {
        ready.push_back(std::move(waiters_[i].fn));
        waiters_[i] = std::move(waiters_.back());
        waiters_.pop_back();
      } else {
        ++i;
      }
    }
    num_waiters_.store(waiters_.size(), std::memory_order_release);
  }
  for (auto& fn : ready) {
    // A throwing callback must not take the worker (and every NIC) down with it.
    try {
      fn();
    } catch (const std::exception& e) {
      fail(Status::internal, "rank " + std::to_string(rank_) + ": an on_imm callback threw: " + e.what());
    } catch (...) {
      fail(Status::internal, "rank " + std::to_string(rank_) + ": an on_imm callback threw");
    }
  }
}

}  // namespace ferry::te
