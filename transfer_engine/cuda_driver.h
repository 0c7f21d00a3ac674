// The few CUDA driver entry points the engine needs (pointer queries, dmabuf export), loaded from
// libcuda.so.1 on first use. Linking libcuda directly would stop every program that uses the engine
// from starting on a machine without the GPU driver (a CI host, a CPU-only rank).
#pragma once
#ifdef FERRY_HAVE_CUDA
#include <cuda.h>

namespace ferry::te {

struct CudaDriver {
  decltype(&::cuInit) init = nullptr;
  decltype(&::cuGetErrorString) get_error_string = nullptr;
  decltype(&::cuPointerGetAttribute) pointer_get_attribute = nullptr;
  // Absent from drivers older than CUDA 11.7; callers fall back to plain FI_HMEM registration.
  decltype(&::cuMemGetHandleForAddressRange) mem_get_handle_for_address_range = nullptr;
  // Optional as well; only GDRCopy-mapped memory needs it (CU_POINTER_ATTRIBUTE_SYNC_MEMOPS).
  decltype(&::cuPointerSetAttribute) pointer_set_attribute = nullptr;
};

// nullptr when libcuda.so.1 cannot be loaded or lacks an essential entry point; the reason is then
// in cuda_driver_error().
const CudaDriver* cuda_driver();
const char* cuda_driver_error();

}  // namespace ferry::te
#endif
