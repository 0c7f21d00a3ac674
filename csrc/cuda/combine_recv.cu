// Combine, receive half: wait for every partial, then per token the sum of its partials (one per
// destination rank it went to) in fp32, written to out_tokens or added to it, rounded once.
#include "csrc/cuda/api.cuh"
#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/device.cuh"

namespace ferry::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kCopyThreads)
    combine_recv_kernel(CombineRecvParams p, Workspace ws) {
  using V = Vec16<T>;
  const ep::Layout& L = p.layout;
  __shared__ const uint8_t* src_s[ep::kMaxTopK];
  const int tid = threadIdx.x;
  if ((p.arrived != nullptr || p.num_ipc_senders > 0) && *ws.arrived == 0) return;

  const int num_tokens = *ws.num_tokens;
  const uint64_t row_bytes = L.out_row_bytes();
  const int nvec = int(row_bytes / 16);
  uint8_t* out_tokens = static_cast<uint8_t*>(p.out_tokens);

  // One block per token (grid-stride), each thread a 16-byte slice of the hidden vector.
  for (int t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    // Where each of the token's partials lies: its destination's buffer (dest_base: IPC peers write
    // elsewhere than the engine) at the slot the token had in that destination's run.
    if (tid < ep::kMaxTopK) {
      const int d = ws.token_dest[t * ep::kMaxTopK + tid];
      const uint8_t* base = p.dest_base != nullptr && d >= 0 ? p.dest_base[d] : p.partial_buf;
      src_s[tid] = d >= 0 ? base + uint64_t(ws.token_slot[t * ep::kMaxTopK + tid]) * L.partial_bytes : nullptr;
    }
    __syncthreads();
    const uint8_t* srcs[ep::kMaxTopK];
#pragma unroll
    for (int j = 0; j < ep::kMaxTopK; ++j) srcs[j] = src_s[j];
    uint8_t* out = out_tokens + uint64_t(t) * row_bytes;
    for (int i = tid; i < nvec; i += kCopyThreads) {
      V in[ep::kMaxTopK];
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j)
        if (srcs[j] != nullptr) in[j].raw = ld_v4(srcs[j] + 16 * uint64_t(i));
      // Same order as the host: the previous value (with accumulate), then partials by destination.
      float acc[V::kN];
      if (p.accumulate) {
        V prev;
        prev.raw = *reinterpret_cast<const uint4*>(out + 16 * uint64_t(i));
#pragma unroll
        for (int x = 0; x < V::kN; ++x) acc[x] = Elem<T>::load(prev.v[x]);
      } else {
#pragma unroll
        for (int x = 0; x < V::kN; ++x) acc[x] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j) {
        if (srcs[j] == nullptr) continue;
#pragma unroll
        for (int x = 0; x < V::kN; ++x) acc[x] += Elem<T>::load(in[j].v[x]);
      }
      V o;
#pragma unroll
      for (int x = 0; x < V::kN; ++x) o.v[x] = Elem<T>::store(acc[x]);
      st_v4(out + 16 * uint64_t(i), o.raw);
    }
    __syncthreads();  // src_s is rewritten for the next token
  }
}

}  // namespace

void combine_recv(const CombineRecvParams& p, const Workspace& ws, int num_sms, cudaStream_t stream) {
  wait_step(p.arrived, p.sender_arrived, p.ipc_senders, p.num_ipc_senders, ws.combine_epoch, p.timeout_ns,
            kErrCombineTimeout, ws, stream);
  const dim3 grid(copy_grid(num_sms, p.layout.max_tokens)), block(kCopyThreads);
  switch (p.layout.out_dtype) {
    case FERRY_BF16: combine_recv_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(p, ws); break;
    case FERRY_F16: combine_recv_kernel<__half><<<grid, block, 0, stream>>>(p, ws); break;
    case FERRY_F32: combine_recv_kernel<float><<<grid, block, 0, stream>>>(p, ws); break;
    default: raise(Status::unsupported, "cuda combine: out_dtype " + std::to_string(p.layout.out_dtype));
  }
  check_cuda(cudaGetLastError(), "launch combine_recv_kernel");
}

}  // namespace ferry::cuda
