// CUDA runtime errors as ferry::Error with the failing call and the runtime's text.
#pragma once
#include <cuda_runtime.h>

#include <string>

#include "transfer_engine/error.h"

namespace ferry::cuda {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  const Status status = err == cudaErrorMemoryAllocation ? Status::out_of_memory : Status::internal;
  raise(status, std::string("cuda: ") + what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

}  // namespace ferry::cuda
