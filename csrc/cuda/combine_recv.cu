// Combine, receive half: wait for every partial, then per token the sum of its partials (one per
// destination rank it went to) in fp32, written to out_tokens or added to it, rounded once. With
// weights at combine, the weighted sum of its expert rows in top-k order, with the caller's weights.
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
  __shared__ float weight_s[ep::kMaxTopK];
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
    // With weights at combine: route k's row (route_row, in its destination's slot) and its weight,
    // in top-k order; otherwise entry j is the partial of destination j, weight 1.
    if (tid < ep::kMaxTopK) {
      if (L.weights_at_combine) {
        const int d = tid < L.top_k ? ws.route_dest[t * ep::kMaxTopK + tid] : -1;
        const uint8_t* base = p.dest_base != nullptr && d >= 0 ? p.dest_base[d] : p.partial_buf;
        src_s[tid] = d >= 0 ? base + uint64_t(ws.route_row[t * ep::kMaxTopK + tid]) * L.partial_bytes : nullptr;
        weight_s[tid] = d >= 0 ? p.weights[t * L.top_k + tid] : 0.f;
      } else {
        const int d = ws.token_dest[t * ep::kMaxTopK + tid];
        const uint8_t* base = p.dest_base != nullptr && d >= 0 ? p.dest_base[d] : p.partial_buf;
        src_s[tid] = d >= 0 ? base + uint64_t(ws.token_slot[t * ep::kMaxTopK + tid]) * L.partial_bytes : nullptr;
        weight_s[tid] = 1.f;
      }
    }
    __syncthreads();
    const uint8_t* srcs[ep::kMaxTopK];
    float w[ep::kMaxTopK];
#pragma unroll
    for (int j = 0; j < ep::kMaxTopK; ++j) {
      srcs[j] = src_s[j];
      w[j] = weight_s[j];
    }
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
      if (L.weights_at_combine) {
#pragma unroll
        for (int j = 0; j < ep::kMaxTopK; ++j) {
          if (srcs[j] == nullptr) continue;
          // Separate multiply and add (no FMA contraction), rounding exactly as the host's loop does.
#pragma unroll
          for (int x = 0; x < V::kN; ++x) acc[x] = __fadd_rn(acc[x], __fmul_rn(w[j], Elem<T>::load(in[j].v[x])));
        }
      } else {
#pragma unroll
        for (int j = 0; j < ep::kMaxTopK; ++j) {
          if (srcs[j] == nullptr) continue;
#pragma unroll
          for (int x = 0; x < V::kN; ++x) acc[x] += Elem<T>::load(in[j].v[x]);
        }
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
