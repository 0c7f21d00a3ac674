// Helper threads for the host backend's byte movers. Combine's sums are independent per record and
// per token, and dispatch's packing per token, so cutting a range into parts gives the same bytes
// whatever the number of threads; the parts only spread the work over cores the rank would leave
// idle. Helpers sleep between calls (a condition variable, no spinning): on a host whose ranks
// already fill the cores they cost nothing, and then host_threads() gives them none anyway.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ferry::ep::host {

class WorkPool {
 public:
  // `threads` in all, the caller included; 1 runs everything on the caller.
  explicit WorkPool(int threads);
  ~WorkPool();
  WorkPool(const WorkPool&) = delete;
  WorkPool& operator=(const WorkPool&) = delete;

  int threads() const { return int(helpers_.size()) + 1; }

  // fn(begin, end) over [0, n) in at most threads() contiguous parts of at least min_part items
  // (fewer parts when n is small: waking a helper costs more than a few items), the caller running
  // the first. Returns when every part ran; rethrows the first exception a part threw.
  void parallel_for(int64_t n, int64_t min_part, const std::function<void(int64_t, int64_t)>& fn);

 private:
  void helper(int part);

  std::vector<std::thread> helpers_;
  std::mutex mutex_;
  std::condition_variable start_cv_, done_cv_;
  uint64_t generation_ = 0;
  bool stop_ = false;
  int parts_ = 0;
  int pending_ = 0;
  int64_t n_ = 0;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  std::exception_ptr error_;
};

// Items per part for items of `item_bytes`: a part of less than ~256 KiB of output costs less than
// waking a thread.
inline int64_t min_part_items(uint64_t item_bytes) {
  const uint64_t items = (uint64_t{256} << 10) / (item_bytes ? item_bytes : 1);
  return items ? int64_t(items) : 1;
}

// Threads for one rank's byte movers: FERRY_HOST_THREADS when set (1..64, else an error naming
// it); otherwise the CPUs this process may run on, shared among the `local_size` ranks of the host
// unless the launcher bound each rank to fewer CPUs than the machine has, less two (the calling
// thread and the engine's worker), between 1 and 8.
int host_threads(int local_size);

}  // namespace ferry::ep::host
