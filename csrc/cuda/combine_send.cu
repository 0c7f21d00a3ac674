// Combine, send half: per received record, the weighted sum over this rank's local experts of that
// token's expert outputs, accumulated in fp32 and rounded once to out_dtype. One partial per record
// travels back (not one per expert); partial g sits at g * partial_bytes, in receive order. With
// weights at combine, the record's expert rows instead, unweighted, in its slot (combine_slot_bytes).
#include "csrc/cuda/api.cuh"
#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/device.cuh"

namespace ferry::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kCopyThreads)
    combine_send_kernel(CombineSendParams p, Workspace ws) {
  using V = Vec16<T>;
  const ep::Layout& L = p.layout;
  __shared__ int rows_s[ep::kMaxTopK];
  __shared__ float weights_s[ep::kMaxTopK];
  const int tid = threadIdx.x;
  if (blockIdx.x == 0 && tid == 0) *ws.combine_epoch += 1;
  const int N = *ws.num_recv;
  const uint64_t row_bytes = L.out_row_bytes();
  const int nvec = int(row_bytes / 16);
  const uint8_t* y = static_cast<const uint8_t*>(p.expert_y);

  // One block per received record (grid-stride), each thread a 16-byte slice of the hidden vector.
  for (int g = blockIdx.x; g < N; g += gridDim.x) {
    if (tid < ep::kMaxTopK) {
      rows_s[tid] = ws.recv_row[g * ep::kMaxTopK + tid];
      weights_s[tid] = ws.recv_weight[g * ep::kMaxTopK + tid];
    }
    __syncthreads();
    int rows[ep::kMaxTopK];
    float w[ep::kMaxTopK];
#pragma unroll
    for (int j = 0; j < ep::kMaxTopK; ++j) {
      rows[j] = rows_s[j];
      w[j] = weights_s[j];
    }
    uint8_t* out = p.partial_buf + uint64_t(g) * L.combine_slot_bytes();
    if (L.weights_at_combine) {
      // The record's rows themselves, route j's at j * partial_bytes of its slot: the source weighs them.
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j) {
        if (rows[j] < 0) continue;
        const uint8_t* row = y + uint64_t(rows[j]) * row_bytes;
        for (int i = tid; i < nvec; i += kCopyThreads)
          st_v4(out + uint64_t(j) * L.partial_bytes + 16 * uint64_t(i), ld_nc_v4(row + 16 * uint64_t(i)));
      }
      __syncthreads();  // rows_s is rewritten for the next record
      continue;
    }
    for (int i = tid; i < nvec; i += kCopyThreads) {
      V in[ep::kMaxTopK];
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j)  // every route's load in flight before the first use
        if (rows[j] >= 0) in[j].raw = ld_nc_v4(y + uint64_t(rows[j]) * row_bytes + 16 * uint64_t(i));
      float acc[V::kN];
#pragma unroll
      for (int x = 0; x < V::kN; ++x) acc[x] = 0.f;
#pragma unroll
      for (int j = 0; j < ep::kMaxTopK; ++j) {
        if (rows[j] < 0) continue;
        // Separate multiply and add (no FMA contraction), rounding exactly as the host's loop does.
#pragma unroll
        for (int x = 0; x < V::kN; ++x) acc[x] = __fadd_rn(acc[x], __fmul_rn(w[j], Elem<T>::load(in[j].v[x])));
      }
      V o;
#pragma unroll
      for (int x = 0; x < V::kN; ++x) o.v[x] = Elem<T>::store(acc[x]);
      st_v4(out + 16 * uint64_t(i), o.raw);
    }
    __syncthreads();  // rows_s is rewritten for the next record
  }

  // The last block to finish tells the proxy thread that its buffer is complete.
  release_when_grid_done(&ws.blocks_done[1], ws.partials_ready, ws.combine_epoch);
}

}  // namespace

void combine_send(const CombineSendParams& p, const Workspace& ws, int num_sms, cudaStream_t stream) {
  const dim3 grid(copy_grid(num_sms, p.layout.max_recv_records())), block(kCopyThreads);
  switch (p.layout.out_dtype) {
    case FERRY_BF16: combine_send_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(p, ws); break;
    case FERRY_F16: combine_send_kernel<__half><<<grid, block, 0, stream>>>(p, ws); break;
    case FERRY_F32: combine_send_kernel<float><<<grid, block, 0, stream>>>(p, ws); break;
    default: raise(Status::unsupported, "cuda combine: out_dtype " + std::to_string(p.layout.out_dtype));
  }
  check_cuda(cudaGetLastError(), "launch combine_send_kernel");
}

}  // namespace ferry::cuda
