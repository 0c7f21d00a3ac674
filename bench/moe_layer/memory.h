// Memory the all-to-all and the GEMM read and write: host memory for the host backend, device
// memory for CUDA (RAII, zeroed at allocation), with checked copies from and to host memory.
#pragma once
#include <cstddef>

namespace ferry::moe {

class Memory {
 public:
  Memory() = default;
  Memory(size_t bytes, bool device);
  ~Memory();
  Memory(Memory&& other) noexcept;
  Memory& operator=(Memory&& other) noexcept;
  Memory(const Memory&) = delete;
  Memory& operator=(const Memory&) = delete;

  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  bool device() const { return device_; }
  // Bytes [offset, offset + bytes) from or to host memory; throws Status::internal past the end.
  void upload(const void* src, size_t bytes, size_t offset = 0);
  void download(void* dst, size_t bytes, size_t offset = 0) const;

 private:
  void reset();
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  bool device_ = false;
};

// cudaStream_t for the CUDA backend (created non-blocking), null for the host.
class Stream {
 public:
  explicit Stream(bool device);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  void* get() const { return stream_; }
  void sync() const;

 private:
  void* stream_ = nullptr;
};

}  // namespace ferry::moe
