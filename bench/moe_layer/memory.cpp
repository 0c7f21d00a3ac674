#include "bench/moe_layer/memory.h"

#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "transfer_engine/error.h"

#if defined(FERRY_HAVE_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace ferry::moe {

namespace {

#if defined(FERRY_HAVE_CUDA)
void check_cuda(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) raise(Status::internal, what + ": " + cudaGetErrorString(e));
}
#endif

#if !defined(FERRY_HAVE_CUDA)
[[noreturn]] void no_cuda() { raise(Status::unsupported, "--backend cuda: this build has no CUDA"); }
#endif

}  // namespace

Memory::Memory(size_t bytes, bool device) : bytes_(bytes), device_(device) {
  if (bytes == 0) return;
  if (device) {
#if defined(FERRY_HAVE_CUDA)
    check_cuda(cudaMalloc(&ptr_, bytes), "cudaMalloc of " + std::to_string(bytes) + " bytes");
    check_cuda(cudaMemset(ptr_, 0, bytes), "cudaMemset");
#else
    no_cuda();
#endif
  } else {
    ptr_ = std::calloc(1, bytes);
    if (!ptr_) raise(Status::out_of_memory, "allocating " + std::to_string(bytes) + " bytes of host memory");
  }
}

Memory::~Memory() { reset(); }

Memory::Memory(Memory&& o) noexcept { *this = std::move(o); }

Memory& Memory::operator=(Memory&& o) noexcept {
  if (this != &o) {
    reset();
    std::swap(ptr_, o.ptr_);
    bytes_ = o.bytes_;
    device_ = o.device_;
  }
  return *this;
}

void Memory::reset() {
  if (!ptr_) return;
#if defined(FERRY_HAVE_CUDA)
  if (device_) cudaFree(ptr_);
#endif
  if (!device_) std::free(ptr_);
  ptr_ = nullptr;
}

void Memory::upload(const void* src, size_t bytes, size_t offset) {
  if (bytes == 0) return;
  if (offset + bytes > bytes_)
    raise(Status::internal, "upload of " + std::to_string(bytes) + " bytes at " + std::to_string(offset) +
                                " past the end of a " + std::to_string(bytes_) + "-byte buffer");
  char* dst = static_cast<char*>(ptr_) + offset;
  if (device_) {
#if defined(FERRY_HAVE_CUDA)
    return check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to the device");
#else
    no_cuda();
#endif
  }
  std::memcpy(dst, src, bytes);
}

void Memory::download(void* dst, size_t bytes, size_t offset) const {
  if (bytes == 0) return;
  if (offset + bytes > bytes_)
    raise(Status::internal, "download of " + std::to_string(bytes) + " bytes at " + std::to_string(offset) +
                                " past the end of a " + std::to_string(bytes_) + "-byte buffer");
  const char* src = static_cast<const char*>(ptr_) + offset;
  if (device_) {
#if defined(FERRY_HAVE_CUDA)
    return check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to the host");
#else
    no_cuda();
#endif
  }
  std::memcpy(dst, src, bytes);
}

Stream::Stream(bool device) {
  if (!device) return;
#if defined(FERRY_HAVE_CUDA)
  cudaStream_t s = nullptr;
  check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  stream_ = s;
#else
  no_cuda();
#endif
}

Stream::~Stream() {
#if defined(FERRY_HAVE_CUDA)
  if (stream_) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
#endif
}

void Stream::sync() const {
#if defined(FERRY_HAVE_CUDA)
  if (stream_) check_cuda(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)), "cudaStreamSynchronize");
#endif
}

}  // namespace ferry::moe
