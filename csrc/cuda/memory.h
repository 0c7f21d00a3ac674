// RAII owners of CUDA allocations used by the backend, its tests and its benchmark.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

#include "csrc/cuda/cuda_check.h"

namespace ferry::cuda {

// cudaMalloc'd device memory.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes) check_cuda(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Pinned host memory mapped into the device's address space: the host-staged transport buffers and
// the flags that GPU and CPU exchange.
class MappedHostBuffer {
 public:
  MappedHostBuffer() = default;
  explicit MappedHostBuffer(size_t bytes) : bytes_(bytes) {
    if (!bytes) return;
    check_cuda(cudaHostAlloc(&host_, bytes, cudaHostAllocMapped | cudaHostAllocPortable), "cudaHostAlloc");
    check_cuda(cudaHostGetDevicePointer(&dev_, host_, 0), "cudaHostGetDevicePointer");
  }
  ~MappedHostBuffer() {
    if (host_) cudaFreeHost(host_);
  }
  MappedHostBuffer(MappedHostBuffer&& o) noexcept
      : host_(std::exchange(o.host_, nullptr)), dev_(std::exchange(o.dev_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  MappedHostBuffer& operator=(MappedHostBuffer&& o) noexcept {
    std::swap(host_, o.host_);
    std::swap(dev_, o.dev_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  template <typename T = void>
  T* host() const { return static_cast<T*>(host_); }
  template <typename T = void>
  T* dev() const { return static_cast<T*>(dev_); }
  size_t bytes() const { return bytes_; }

 private:
  void* host_ = nullptr;
  void* dev_ = nullptr;
  size_t bytes_ = 0;
};

// Another process's device allocation, opened from its cudaIpcMemHandle_t; closed at destruction.
class IpcMapping {
 public:
  IpcMapping() = default;
  explicit IpcMapping(const cudaIpcMemHandle_t& handle) {
    check_cuda(cudaIpcOpenMemHandle(&ptr_, handle, cudaIpcMemLazyEnablePeerAccess), "cudaIpcOpenMemHandle");
  }
  ~IpcMapping() {
    if (ptr_) cudaIpcCloseMemHandle(ptr_);
  }
  IpcMapping(IpcMapping&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)) {}
  IpcMapping& operator=(IpcMapping&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    return *this;
  }
  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
};

class Stream {
 public:
  // blocking: ordered with the legacy default stream (what plain cudaMemcpy/cudaMemset use), as a
  // test or benchmark that mixes the two needs; non-blocking otherwise.
  explicit Stream(bool blocking = false) {
    check_cuda(cudaStreamCreateWithFlags(&s_, blocking ? cudaStreamDefault : cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~Stream() { cudaStreamDestroy(s_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

class Event {
 public:
  Event() { check_cuda(cudaEventCreate(&e_), "cudaEventCreate"); }
  ~Event() { cudaEventDestroy(e_); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

}  // namespace ferry::cuda
