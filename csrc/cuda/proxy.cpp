#include "csrc/cuda/proxy.h"

#include <cuda_runtime.h>
#include <hwloc.h>
#include <hwloc/cudart.h>
#include <sched.h>

#include <chrono>
#include <vector>

#include "csrc/cuda/cuda_check.h"
#include "csrc/errors.h"

namespace ferry::cuda {
namespace {

// Pins the calling thread to the cores nearest the GPU (its NUMA node); best effort, since a
// container may hide the topology.
void pin_near_gpu(int device) {
  hwloc_topology_t topo;
  if (hwloc_topology_init(&topo) != 0) return;
  if (hwloc_topology_load(topo) == 0) {
    hwloc_cpuset_t set = hwloc_bitmap_alloc();
    if (hwloc_cudart_get_device_cpuset(topo, device, set) == 0 && !hwloc_bitmap_iszero(set))
      hwloc_set_cpubind(topo, set, HWLOC_CPUBIND_THREAD);
    hwloc_bitmap_free(set);
  }
  hwloc_topology_destroy(topo);
}

uint32_t load_acquire(const volatile uint32_t* p) {
  return __atomic_load_n(const_cast<const uint32_t*>(p), __ATOMIC_ACQUIRE);
}

}  // namespace

Proxy::Proxy(ep::Protocol& protocol, const Workspace& ws, ArrivalFlagWriter flags, int cuda_device)
    : protocol_(protocol), ws_(ws), flags_(flags), cuda_device_(cuda_device) {
  thread_ = std::thread([this] { run(); });
}

Proxy::~Proxy() {
  stop_.store(true);
  if (thread_.joinable()) thread_.join();
}

std::string Proxy::error(Status* status) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (status) *status = error_status_;
  return error_;
}

ep::ProtocolStats Proxy::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void Proxy::fail(Status status, const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_.exchange(true)) return;
  error_status_ = status;
  error_ = what;
}

// Idle between steps is legitimate (the caller decides when to dispatch), so there is no deadline
// here; the receive kernels and the Protocol's waits carry the deadlines.
bool Proxy::wait_signal(const volatile uint32_t* signal, uint32_t step) {
  int spins = 0;
  while (int32_t(load_acquire(signal) - step) < 0) {
    if (stop_.load(std::memory_order_relaxed)) return false;
    if (++spins > 4096) std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  return true;
}

void Proxy::run() {
  pin_near_gpu(cuda_device_);
  // The Protocol's copies (count headers, records to self) may touch device buffers.
  cudaSetDevice(cuda_device_);
  const ep::Layout& L = protocol_.layout();
  const int R = L.world_size;
  std::vector<int32_t> counts(R), received(R), record_routes, slot_routes;
  std::vector<int64_t> offsets(R + 1);
  auto guarded = [&](const char* what, auto&& fn) {
    if (failed_.load()) return;
    try {
      fn();
    } catch (const Error& e) {
      fail(e.status(), e.what());
    } catch (const std::exception& e) {
      fail(Status::internal, ep::describe({L.rank, -1, std::string("cuda proxy, ") + what}, e.what()));
    }
  };
  guarded("dispatch SEND", [&] { protocol_.begin_dispatch(); });
  for (uint32_t step = 1;; ++step) {
    if (!wait_signal(ws_.send_ready, step)) return;
    guarded("dispatch SEND", [&] {
      const int32_t code = __atomic_load_n(&ws_.error->code, __ATOMIC_ACQUIRE);
      if (code == kErrInvalidExpert || code == kErrRepeatedExpert || code == kErrBoundTooLarge) {
        // This rank's input was bad: peers learn it at once from poisoned headers; the caller
        // learns it from the device error at its receive call.
        protocol_.post_dispatch_failure();
        return;
      }
      int64_t run = 0;
      for (int d = 0; d < R; ++d) {
        counts[d] = __atomic_load_n(&ws_.host_dest_count[d], __ATOMIC_RELAXED);
        offsets[d] = run;
        run += counts[d];
      }
      offsets[R] = run;
      protocol_.post_dispatch(counts, offsets);
    });
    guarded("dispatch RECV", [&] {
      protocol_.wait_dispatch();
      protocol_.begin_combine();
    });
    flags_.raise_dispatch(step);

    if (!wait_signal(ws_.partials_ready, step)) return;
    guarded("combine", [&] {
      if (protocol_.has_direct_peers() || L.weights_at_combine) {
        // Written by the dispatch receive kernels, which ran before the partials were released.
        int64_t records = 0;
        for (int s = 0; s < R; ++s) {
          received[s] = protocol_.has_direct_peers() ? __atomic_load_n(&ws_.host_recv_count[s], __ATOMIC_RELAXED)
                                                     : protocol_.recv_plan().count[s];
          records += received[s] > 0 ? received[s] : 0;
        }
        record_routes.clear();
        if (L.weights_at_combine)
          for (int64_t g = 0; g < records && g < int64_t(L.max_recv_records()); ++g)
            record_routes.push_back(__atomic_load_n(&ws_.host_record_routes[g], __ATOMIC_RELAXED));
        protocol_.post_combine(received, record_routes);
      } else {
        protocol_.post_combine();
      }
      // With weights at combine, the rows each send slot gets back (written by the pack kernel).
      slot_routes.clear();
      if (L.weights_at_combine)
        for (int64_t slot = 0; slot < offsets[R]; ++slot)
          slot_routes.push_back(__atomic_load_n(&ws_.host_slot_routes[slot], __ATOMIC_RELAXED));
      protocol_.wait_combine(slot_routes);
      {
        std::lock_guard<std::mutex> lock(mu_);
        stats_ = protocol_.stats();
      }
      protocol_.begin_dispatch();
    });
    flags_.raise_combine(step);
  }
}

}  // namespace ferry::cuda
