// cuBLAS GEMM for --overlap with the CUDA backend (compiled only when cuBLAS is found).
#if defined(FERRY_BENCH_CUBLAS)
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>

#include "bench/ep/gemm.h"
#include "transfer_engine/error.h"

namespace ferry::bench {

namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) raise(Status::internal, std::string(what) + ": " + cudaGetErrorString(e));
}
void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) raise(Status::internal, std::string(what) + " failed: cuBLAS status " + std::to_string(int(s)));
}

struct DeviceBuffer {
  float* ptr = nullptr;
  explicit DeviceBuffer(size_t elems) { check_cuda(cudaMalloc(reinterpret_cast<void**>(&ptr), elems * sizeof(float)), "cudaMalloc for the overlap GEMM"); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

class CublasGemm final : public Gemm {
 public:
  CublasGemm(int m, int n, int k, void* stream)
      : m_(m), n_(n), k_(k), stream_(static_cast<cudaStream_t>(stream)),
        a_(size_t(m) * k), b_(size_t(k) * n), c_(size_t(m) * n) {
    check_cublas(cublasCreate(&handle_), "cublasCreate");
    check_cublas(cublasSetStream(handle_, stream_), "cublasSetStream");
    check_cuda(cudaMemsetAsync(a_.ptr, 0, size_t(m) * k * sizeof(float), stream_), "cudaMemset");
    check_cuda(cudaMemsetAsync(b_.ptr, 0, size_t(k) * n * sizeof(float), stream_), "cudaMemset");
  }
  ~CublasGemm() override { cublasDestroy(handle_); }
  void run() override {
    const float alpha = 1.0f, beta = 0.0f;
    // Row-major C = A B is column-major C^T = B^T A^T.
    check_cublas(cublasSgemm(handle_, CUBLAS_OP_N, CUBLAS_OP_N, n_, m_, k_, &alpha, b_.ptr, n_, a_.ptr,
                             k_, &beta, c_.ptr, n_),
                 "cublasSgemm");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize after the overlap GEMM");
  }
  double flops() const override { return 2.0 * m_ * n_ * k_; }

 private:
  int m_, n_, k_;
  cudaStream_t stream_;
  cublasHandle_t handle_ = nullptr;
  DeviceBuffer a_, b_, c_;
};

}  // namespace

std::unique_ptr<Gemm> make_cuda_gemm(int m, int n, int k, void* stream) {
  return std::make_unique<CublasGemm>(m, n, k, stream);
}

}  // namespace ferry::bench
#endif
