#include "bench/ep/gemm.h"

#include "bench/moe_layer/grouped_gemm.h"
#include "transfer_engine/error.h"

namespace ferry::bench {

namespace {

class HostGemm final : public Gemm {
 public:
  HostGemm(int m, int n, int k)
      : m_(m), n_(n), k_(k), a_(size_t(m) * k), b_(size_t(k) * n), c_(size_t(m) * n) {
    for (size_t i = 0; i < a_.size(); ++i) a_[i] = float(i % 7) * 0.25f - 0.5f;
    for (size_t i = 0; i < b_.size(); ++i) b_[i] = float(i % 5) * 0.125f - 0.25f;
  }
  void run() override { moe::sgemm_strided(m_, n_, k_, a_.data(), k_, b_.data(), n_, c_.data(), n_); }
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
