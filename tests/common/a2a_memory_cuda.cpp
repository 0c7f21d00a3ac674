// The CUDA side of tests/common/a2a_run.h: rank buffers in device memory of GPU 0 (every rank of
// these tests shares the one GPU), copied with the plain runtime calls on the legacy stream, which a
// blocking stream waits for.
#include <cuda_runtime.h>

#include <memory>
#include <vector>

#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/memory.h"
#include "tests/common/a2a_run.h"

namespace ferry::testing {

namespace {

class CudaMemory final : public RankMemory {
 public:
  CudaMemory() {
    cuda::check_cuda(cudaSetDevice(0), "cudaSetDevice");
    stream_ = std::make_unique<cuda::Stream>(/*blocking=*/true);
  }
  void* allocate(size_t bytes) override {
    blocks_.emplace_back(bytes < 16 ? 16 : bytes);
    return blocks_.back().get();
  }
  void upload(void* dst, const void* src, size_t bytes) override {
    if (bytes) cuda::check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "upload");
  }
  void download(void* dst, const void* src, size_t bytes) override {
    if (bytes) cuda::check_cuda(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "download");
  }
  void fill(void* dst, uint8_t byte, size_t bytes) override {
    cuda::check_cuda(cudaMemset(dst, byte, bytes), "fill");
  }
  void* stream() override { return stream_->get(); }

 private:
  std::unique_ptr<cuda::Stream> stream_;
  std::vector<cuda::DeviceBuffer> blocks_;
};

}  // namespace

std::unique_ptr<RankMemory> make_cuda_rank_memory() { return std::make_unique<CudaMemory>(); }

}  // namespace ferry::testing
