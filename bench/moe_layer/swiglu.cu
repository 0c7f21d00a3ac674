#include <cuda_runtime_api.h>

#include <string>

#include "bench/moe_layer/swiglu.h"
#include "csrc/dtype.h"
#include "transfer_engine/error.h"

namespace ferry::moe {

namespace {

// One block per row of the batched layout; rows past their expert's count return at once.
__global__ void swiglu_kernel(const uint16_t* gate_up, uint16_t* act, const int32_t* counts, int max_rows,
                              int intermediate) {
  const int row = blockIdx.x;
  if (row % max_rows >= counts[row / max_rows]) return;
  const uint16_t* in = gate_up + size_t(row) * 2 * intermediate;
  uint16_t* out = act + size_t(row) * intermediate;
  for (int j = threadIdx.x; j < intermediate; j += blockDim.x) {
    const float g = ep::dtype::bf16_to_f32(in[j]), u = ep::dtype::bf16_to_f32(in[intermediate + j]);
    const float silu = g / (1.0f + expf(-g));
    out[j] = ep::dtype::f32_to_bf16(silu * u);
  }
}

}  // namespace

void launch_swiglu(const void* gate_up, void* act, const int32_t* counts, int experts, int max_rows, int intermediate,
                   void* stream) {
  if (experts * max_rows == 0) return;
  swiglu_kernel<<<experts * max_rows, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint16_t*>(gate_up), static_cast<uint16_t*>(act), counts, max_rows, intermediate);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess)
    raise(Status::internal, std::string("SwiGLU kernel launch: ") + cudaGetErrorString(e));
}

}  // namespace ferry::moe
