#include "bench/ep/gemm.h"

#include <algorithm>

#include "transfer_engine/error.h"

namespace ferry::bench {

void sgemm_blocked(int m, int n, int k, const float* a, const float* b, float* c) {
  constexpr int kBlockK = 128, kBlockN = 256;
  std::fill(c, c + static_cast<size_t>(m) * n, 0.0f);
  for (int k0 = 0; k0 < k; k0 += kBlockK) {
    const int k1 = std::min(k, k0 + kBlockK);
    for (int n0 = 0; n0 < n; n0 += kBlockN) {
      const int n1 = std::min(n, n0 + kBlockN);
      for (int i = 0; i < m; ++i) {
        float* crow = c + static_cast<size_t>(i) * n;
        for (int kk = k0; kk < k1; ++kk) {
          const float aik = a[static_cast<size_t>(i) * k + kk];
          const float* brow = b + static_cast<size_t>(kk) * n;
          for (int j = n0; j < n1; ++j) crow[j] += aik * brow[j];  // vectorizes over j
        }
      }
    }
  }
}

namespace {

class HostGemm final : public Gemm {
 public:
  HostGemm(int m, int n, int k)
      : m_(m), n_(n), k_(k), a_(size_t(m) * k), b_(size_t(k) * n), c_(size_t(m) * n) {
    for (size_t i = 0; i < a_.size(); ++i) a_[i] = float(i % 7) * 0.25f - 0.5f;
    for (size_t i = 0; i < b_.size(); ++i) b_[i] = float(i % 5) * 0.125f - 0.25f;
  }
  void run() override { sgemm_blocked(m_, n_, k_, a_.data(), b_.data(), c_.data()); }
  double flops() const override { return 2.0 * m_ * n_ * k_; }

 private:
  int m_, n_, k_;
  std::vector<float> a_, b_, c_;
};

}  // namespace

std::unique_ptr<Gemm> make_host_gemm(int m, int n, int k) { return std::make_unique<HostGemm>(m, n, k); }

#if !defined(FERRY_BENCH_CUBLAS)
std::unique_ptr<Gemm> make_cuda_gemm(int, int, int, void*) {
  raise(Status::unsupported, "--overlap with --backend cuda needs cuBLAS; this build has none");
}
#endif

}  // namespace ferry::bench
