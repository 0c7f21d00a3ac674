// Same-node peers through CUDA IPC: the bytes the Protocol would write over the transfer engine go
// straight into the peers' receive and combine regions (mapped with cudaIpcOpenMemHandle), at the
// very offsets the Protocol uses, so the receive kernels and the byte layout stay unchanged. Each
// rank's flag array holds one epoch per sender for dispatch and one for combine; a sender raises its
// slot with a system-scope release once its bytes are in, and the receiver waits for the slot of
// every IPC peer (and for the proxy's flag when other peers go through the engine).
//
// Back-to-back steps need no parity: a rank pushes step n+1's records to B only after its own
// combine of step n completed, which needs B's partials of step n, which B pushes only after it
// unpacked step n's records; likewise for the combine regions. Epochs only grow, so no reset.
#include <algorithm>

#include "csrc/cuda/api.cuh"
#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/device.cuh"

namespace ferry::cuda {
namespace {

// Copies `bytes` (multiple of 16) from src to dst, the calling blocks striding together.
__device__ __forceinline__ void copy_v4(uint8_t* dst, const uint8_t* src, uint64_t bytes, uint64_t first,
                                        uint64_t stride) {
  for (uint64_t i = first * 16; i < bytes; i += stride * 16) st_v4(dst + i, ld_v4(src + i));
}

// The last block of the grid raises `slot` (this rank's) to the step's epoch in every IPC peer's flag
// array. Every block's copies happen before its fence; the last block sees all blocks counted.
__device__ void signal_all_when_grid_done(uint32_t* blocks_done, const IpcPeers& peers, int slot,
                                          const uint32_t* epoch) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    last = atomicAdd(blocks_done, 1u) == gridDim.x - 1;
    if (last) *blocks_done = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence_system();
  const uint32_t value = *epoch;
  for (int i = threadIdx.x; i < peers.num_ranks; i += blockDim.x)
    st_release_sys(peers.flags[peers.ranks[i]] + slot, value);
}

// Grid: num_ranks * blocks_per_dest blocks. IPC peer d's section of the send buffer (count header
// and run, contiguous) goes to d's receive region at this rank's private offset; the IPC layout has
// private_tokens = max_tokens, so there is no overflow. Sections of engine peers are the proxy's.
__global__ void __launch_bounds__(kCopyThreads)
    ipc_dispatch_push_kernel(ep::Layout L, const uint8_t* send_buf, IpcPeers peers, Workspace ws,
                             int blocks_per_dest) {
  const int d = peers.ranks[blockIdx.x / blocks_per_dest], part = blockIdx.x % blocks_per_dest;
  const int count = min(max(ws.dest_count[d], 0), L.private_tokens);
  const uint8_t* src = send_buf + L.send_section_offset(d, ws.dest_offset[d]);
  uint8_t* dst = peers.recv[d] + L.recv_private_offset(L.rank);
  const uint64_t bytes = L.count_header_bytes + uint64_t(count) * L.record_bytes;
  copy_v4(dst, src, bytes, uint64_t(part) * blockDim.x + threadIdx.x, uint64_t(blocks_per_dest) * blockDim.x);
  signal_all_when_grid_done(&peers.blocks_done[0], peers, L.rank, ws.dispatch_epoch);
}

// Block per received record (grid-stride): a record from an IPC peer sends its partial back to the
// sender's combine region at the slot the record had in the sender's send run: the sender's records
// to ranks before this one (from its count header, still in this rank's receive region) plus the
// record's index in its run. Partials of records from engine peers are the proxy's.
__global__ void __launch_bounds__(kCopyThreads)
    ipc_combine_push_kernel(ep::Layout L, const uint8_t* partial_buf, const uint8_t* recv_buf, IpcPeers peers,
                            Workspace ws) {
  __shared__ int64_t slot_s;
  __shared__ int sender_s;
  const int me = L.rank;
  const int N = *ws.num_recv;
  const uint64_t stride = L.private_stride();
  const int64_t max_slots = L.max_send_records();
  for (int g = blockIdx.x; g < N; g += gridDim.x) {
    if (threadIdx.x < kWarpSize) {
      const uint64_t off = ws.recv_offset[g];
      const int s = int(off / stride);
      const int64_t index = int64_t((off - s * stride - L.count_header_bytes) / L.record_bytes);
      const bool ipc = peers.combine[s] != nullptr;
      const int32_t* counts = ep::header_counts(recv_buf + L.recv_private_offset(s));
      int64_t before = 0;
      if (ipc)
        for (int d = threadIdx.x; d < me; d += kWarpSize) before += max(ld_cv_s32(counts + d), 0);
#pragma unroll
      for (int o = kWarpSize / 2; o > 0; o >>= 1) before += __shfl_xor_sync(0xffffffffu, before, o);
      if (threadIdx.x == 0) {
        int64_t slot = ipc ? before + index : -1;
        if (ipc && (slot < 0 || slot >= max_slots)) {
          set_error(ws.error, kErrPeerCount, s, int32_t(before), 0);
          slot = -1;
        }
        slot_s = slot;
        sender_s = s;
      }
    }
    __syncthreads();
    const int64_t slot = slot_s;
    // The slot's partial, or with weights at combine the rows of its routes (the slot's used part).
    uint64_t bytes = L.partial_bytes;
    if (L.weights_at_combine) {
      int routes = 0;
      for (int r = 0; r < ep::kMaxTopK; ++r) routes += ws.recv_expert[g * ep::kMaxTopK + r] >= 0 ? 1 : 0;
      bytes = uint64_t(routes) * L.partial_bytes;
    }
    if (slot >= 0)
      copy_v4(peers.combine[sender_s] + uint64_t(slot) * L.combine_slot_bytes(),
              partial_buf + uint64_t(g) * L.combine_slot_bytes(), bytes, threadIdx.x, blockDim.x);
    __syncthreads();  // slot_s is rewritten for the next record
  }
  signal_all_when_grid_done(&peers.blocks_done[1], peers, L.world_size + me, ws.combine_epoch);
}

// One block waits for the listed senders' slots and the proxy's flag (thread 0, when set) to reach
// the step's epoch, under one deadline; a miss names the first sender still missing (error c, -1 for
// the proxy's flag) and the flag value it left.
__global__ void wait_step_kernel(const volatile uint32_t* proxy_flag, const volatile uint32_t* flags,
                                 const int32_t* senders, int num_senders, const uint32_t* epoch, uint64_t timeout_ns,
                                 int32_t timeout_code, Workspace ws) {
  const uint32_t want = *epoch;
  const uint64_t start = global_timer_ns();
  bool ok = true;
  const int waits = num_senders + (proxy_flag != nullptr ? 1 : 0);
  for (int i = threadIdx.x; i < waits && ok; i += blockDim.x) {
    const int s = i < num_senders ? senders[i] : -1;
    const volatile uint32_t* flag = s >= 0 ? flags + s : proxy_flag;
    uint32_t v = ld_acquire_sys(flag);
    while (int32_t(v - want) < 0) {
      if (global_timer_ns() - start > timeout_ns) {
        set_error(ws.error, timeout_code, int32_t(want), int32_t(v), s);
        ok = false;
        break;
      }
      __nanosleep(128);
      v = ld_acquire_sys(flag);
    }
  }
  const bool all = __syncthreads_and(ok);
  if (threadIdx.x == 0) *ws.arrived = all ? 1 : 0;
  // Later kernels read what the flags guard with ordinary loads: make them see it from here on.
  __threadfence_system();
}

}  // namespace

void ipc_dispatch_push(const ep::Layout& layout, const uint8_t* send_buf, const IpcPeers& peers, const Workspace& ws,
                       int num_sms, cudaStream_t stream) {
  // Enough blocks to keep the copy engines of every SM busy at decode sizes, a few per destination.
  if (peers.num_ranks <= 0) return;
  const int blocks_per_dest = std::max(1, std::min(16, 2 * num_sms / peers.num_ranks));
  ipc_dispatch_push_kernel<<<peers.num_ranks * blocks_per_dest, kCopyThreads, 0, stream>>>(layout, send_buf, peers, ws,
                                                                                          blocks_per_dest);
  check_cuda(cudaGetLastError(), "launch ipc_dispatch_push_kernel");
}

void ipc_combine_push(const ep::Layout& layout, const uint8_t* partial_buf, const uint8_t* recv_buf,
                      const IpcPeers& peers, const Workspace& ws, int num_sms, cudaStream_t stream) {
  if (peers.num_ranks <= 0) return;
  ipc_combine_push_kernel<<<copy_grid(num_sms, layout.max_recv_records()), kCopyThreads, 0, stream>>>(
      layout, partial_buf, recv_buf, peers, ws);
  check_cuda(cudaGetLastError(), "launch ipc_combine_push_kernel");
}

void wait_step(const volatile uint32_t* proxy_flag, const volatile uint32_t* sender_flags, const int32_t* senders,
               int num_senders, const uint32_t* epoch, uint64_t timeout_ns, int32_t timeout_code, const Workspace& ws,
               cudaStream_t stream) {
  if (num_senders <= 0) {
    if (proxy_flag != nullptr) wait_arrival(proxy_flag, epoch, timeout_ns, timeout_code, ws, stream);
    return;
  }
  const int waits = num_senders + (proxy_flag != nullptr ? 1 : 0);
  const int threads = std::min(1024, (waits + kWarpSize - 1) / kWarpSize * kWarpSize);
  wait_step_kernel<<<1, threads, 0, stream>>>(proxy_flag, sender_flags, senders, num_senders, epoch, timeout_ns,
                                              timeout_code, ws);
  check_cuda(cudaGetLastError(), "launch wait_step_kernel");
}

}  // namespace ferry::cuda
