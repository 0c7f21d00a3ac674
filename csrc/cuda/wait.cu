// The one place a kernel waits for the CPU: the proxy raises an arrival flag (pinned mapped host
// memory, or device memory written through a GDRCopy BAR mapping) once every expected immediate is
// in; a single thread polls it, so the kernels after it on the stream start on complete data without
// a thousand blocks polling. With CUDA IPC peers, wait_step (ipc.cu) waits for their epochs too.
#include "csrc/cuda/api.cuh"
#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/device.cuh"

namespace ferry::cuda {
namespace {

__global__ void wait_arrival_kernel(const volatile uint32_t* flag, const uint32_t* epoch, uint64_t timeout_ns,
                                    int32_t timeout_code, Workspace ws) {
  const uint32_t want = *epoch;
  uint32_t seen = 0;
  const bool ok = wait_epoch(flag, want, timeout_ns, &seen);
  if (!ok) set_error(ws.error, timeout_code, int32_t(want), int32_t(seen), -1);
  *ws.arrived = ok ? 1 : 0;
  // Later kernels read what the flag guards with ordinary loads: make them see it from here on.
  __threadfence_system();
}

}  // namespace

void wait_arrival(const volatile uint32_t* flag, const uint32_t* epoch, uint64_t timeout_ns, int32_t timeout_code,
                  const Workspace& ws, cudaStream_t stream) {
  wait_arrival_kernel<<<1, 1, 0, stream>>>(flag, epoch, timeout_ns, timeout_code, ws);
  check_cuda(cudaGetLastError(), "launch wait_arrival_kernel");
}

}  // namespace ferry::cuda
