// The work --overlap runs between SEND and RECV: a GEMM standing in for the shared expert or the
// grouped expert GEMM of a real step. Host backend: the MoE layer's blocked single-precision GEMM
// (moe::sgemm_strided) on this thread;
// CUDA backend: cuBLAS on the dispatch stream.
#pragma once
#include <memory>
#include <vector>

namespace ferry::bench {

class Gemm {
 public:
  virtual ~Gemm() = default;
  // C[m][n] = A[m][k] * B[k][n]; returns when the result is complete (the CUDA one synchronizes).
  virtual void run() = 0;
  virtual double flops() const = 0;
};

std::unique_ptr<Gemm> make_host_gemm(int m, int n, int k);
// stream: the cudaStream_t the a2a uses. Throws Status::unsupported when built without cuBLAS.
std::unique_ptr<Gemm> make_cuda_gemm(int m, int n, int k, void* stream);

}  // namespace ferry::bench
