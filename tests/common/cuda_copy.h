// Copies between host and device memory for the CUDA tests, checked: a failed copy throws naming
// which way it went. The runtime infers the direction from the pointers (unified addressing, always
// on in 64-bit processes), so device, pinned and mapped buffers all go through the same two calls.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "csrc/cuda/cuda_check.h"

namespace ferry::testing {

template <typename T>
std::vector<T> download(const void* dev, size_t count) {
  std::vector<T> out(count);
  cuda::check_cuda(cudaMemcpy(out.data(), dev, count * sizeof(T), cudaMemcpyDefault), "download");
  return out;
}

inline void upload(void* dev, const void* host, size_t bytes) {
  if (bytes) cuda::check_cuda(cudaMemcpy(dev, host, bytes, cudaMemcpyDefault), "upload");
}

}  // namespace ferry::testing
