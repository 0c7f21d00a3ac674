#include "csrc/host/work_pool.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#include "csrc/errors.h"

namespace ferry::ep::host {

WorkPool::WorkPool(int threads) {
  for (int part = 1; part < threads; ++part) helpers_.emplace_back([this, part] { helper(part); });
}

WorkPool::~WorkPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (std::thread& t : helpers_) t.join();
}

void WorkPool::parallel_for(int64_t n, int64_t min_part, const std::function<void(int64_t, int64_t)>& fn) {
  const int64_t by_size = n / std::max<int64_t>(min_part, 1);
  const int parts = int(std::clamp<int64_t>(by_size, 1, threads()));
  if (parts == 1) {
    if (n > 0) fn(0, n);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fn_ = &fn;
    n_ = n;
    parts_ = parts;
    pending_ = parts - 1;
    error_ = nullptr;
    ++generation_;
  }
  start_cv_.notify_all();
  std::exception_ptr mine;
  try {
    fn(0, n / parts);
  } catch (...) {
    mine = std::current_exception();
  }
  std::unique_lock<std::mutex> lock(mutex_);
  // Local work on memory this process owns: it always ends, so this wait needs no deadline.
  done_cv_.wait(lock, [&] { return pending_ == 0; });
  fn_ = nullptr;
  if (mine) std::rethrow_exception(mine);
  if (error_) std::rethrow_exception(error_);
}

void WorkPool::helper(int part) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    start_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    if (part >= parts_) continue;  // this call needs fewer parts
    const int64_t begin = n_ * part / parts_, end = n_ * (part + 1) / parts_;
    const auto* fn = fn_;
    lock.unlock();
    std::exception_ptr error;
    try {
      (*fn)(begin, end);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (error && !error_) error_ = error;
    if (--pending_ == 0) done_cv_.notify_one();
  }
}

int host_threads(int local_size) {
  if (const char* env = std::getenv("FERRY_HOST_THREADS"); env && *env) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (*end != '\0' || v < 1 || v > 64)
      raise(Status::invalid_argument,
            std::string("FERRY_HOST_THREADS='") + env + "': expected the number of threads for the host byte movers, "
            "1 to 64");
    return int(v);
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  const long online = sysconf(_SC_NPROCESSORS_ONLN);
  // Bound by the launcher to fewer CPUs than the host has: those are this rank's alone.
  if (online > 0 && cpus >= online) cpus /= std::max(local_size, 1);
  return std::clamp(cpus - 2, 1, 8);
}

}  // namespace ferry::ep::host
