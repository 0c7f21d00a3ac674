// The CPU proxy of the CUDA backend: one thread per GPU, pinned to cores near it, that turns the
// kernels' signals (pinned mapped host memory) into Protocol operations and raises the arrival flags
// the receive kernels wait for (device memory through GDRCopy where installed, see gdrcopy.h). The
// caller's thread only enqueues kernels, so a whole step can be captured in a CUDA graph and
// replayed: the proxy follows the device-side step counter.
//
// Per step n (the device counts dispatch and combine steps from 1):
//   pack kernels store send_ready = n      -> post_dispatch (or post_dispatch_failure on bad input)
//                                            wait_dispatch, begin_combine
//                                          -> dispatch_arrived = n   (dispatch receive kernels go)
//   combine-send kernel stores partials_ready = n -> post_combine, wait_combine, begin_dispatch
//                                          -> combine_arrived = n    (combine receive kernel goes)
// begin_dispatch for step n+1 runs before combine_arrived = n, so the next pack (stream-ordered after
// the combine receive) never overwrites a send buffer the NIC still reads; likewise begin_combine
// before dispatch_arrived for the combine-send buffer.
#pragma once
#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

#include "csrc/cuda/api.cuh"
#include "csrc/cuda/gdrcopy.h"
#include "csrc/protocol.h"

namespace ferry::cuda {

class Proxy {
 public:
  // `ws` host-side views (error, send_ready, partials_ready, host_dest_count) are read from this
  // thread; `flags` raises the arrival epochs (mapped host memory or a GDRCopy BAR mapping, see
  // gdrcopy.h). cuda_device: the GPU whose cores the thread uses.
  // When the Protocol leaves some peers to CUDA IPC, its post_combine gets the records received from
  // every sender, which the dispatch receive kernels mirror to host_recv_count.
  Proxy(ep::Protocol& protocol, const Workspace& ws, ArrivalFlagWriter flags, int cuda_device);
  ~Proxy();
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  // The first failure the proxy saw (empty when none) and its status.
  std::string error(Status* status) const;
  // The Protocol's statistics as of the last completed step (the Protocol itself is this thread's).
  ep::ProtocolStats stats() const;

 private:
  void run();
  bool wait_signal(const volatile uint32_t* signal, uint32_t step);
  void fail(Status status, const std::string& what);

  ep::Protocol& protocol_;
  Workspace ws_;
  ArrivalFlagWriter flags_;
  int cuda_device_;
  std::atomic<bool> stop_{false};
  mutable std::mutex mu_;
  std::string error_;
  Status error_status_ = Status::ok;
  ep::ProtocolStats stats_;
  std::atomic<bool> failed_{false};
  std::thread thread_;
};

}  // namespace ferry::cuda
