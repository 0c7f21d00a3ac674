// The CUDA grouped GEMM: gate_up and down as two cublasGemmGroupedBatchedEx calls (bf16 in and out,
// fp32 compute), one group per local expert that received rows, with the SwiGLU kernel between.
// cuBLAS takes each group's row count from the host, so the layer copies the dispatch counts to the
// host after dispatch RECV (a stream synchronisation the device-side counts of vLLM's batched
// kernels avoid); the pointer arrays go to the device with each call.
#if defined(FERRY_MOE_CUBLAS)
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "bench/moe_layer/grouped_gemm.h"
#include "bench/moe_layer/memory.h"
#include "bench/moe_layer/swiglu.h"
#include "csrc/dtype.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

namespace ferry::moe {

namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) raise(Status::internal, std::string(what) + ": " + cudaGetErrorString(e));
}
void check_cublas(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    raise(Status::internal, std::string(what) + " failed: " + cublasGetStatusName(s) + " (" + cublasGetStatusString(s) + ")");
}

// The arguments of one grouped call, host side (cuBLAS reads these from the host), and its pointer
// arrays (which cuBLAS reads from the device).
struct GroupedCall {
  std::vector<cublasOperation_t> trans;
  std::vector<int> m, n, k, lda, ldb, ldc, group_size;
  std::vector<float> alpha, beta;
  std::vector<const void*> a, b;
  std::vector<void*> c;
  void clear() {
    for (auto* v : {&m, &n, &k, &lda, &ldb, &ldc, &group_size}) v->clear();
    trans.clear();
    alpha.clear();
    beta.clear();
    a.clear();
    b.clear();
    c.clear();
  }
  // Row-major C[rows][cols] = A[rows][depth] * W[depth][cols] is column-major C^T = W^T A^T: cuBLAS's
  // A is W (ld cols), its B is A (ld depth), its C is C (ld cols).
  void add(const void* w, const void* x, void* y, int rows, int cols, int depth) {
    trans.push_back(CUBLAS_OP_N);
    m.push_back(cols);
    n.push_back(rows);
    k.push_back(depth);
    lda.push_back(cols);
    ldb.push_back(depth);
    ldc.push_back(cols);
    group_size.push_back(1);
    alpha.push_back(1.0f);
    beta.push_back(0.0f);
    a.push_back(w);
    b.push_back(x);
    c.push_back(y);
  }
};

class CudaGroupedGemm final : public GroupedGemm {
 public:
  CudaGroupedGemm(const LayerShape& s, int rank, int max_rows, void* stream)
      : s_(s), local_(s.experts_per_rank()), max_rows_(max_rows), stream_(static_cast<cudaStream_t>(stream)) {
    const int H = s.hidden, I = s.intermediate;
    if (s.out_dtype != FERRY_BF16) raise(Status::unsupported, "the CUDA grouped GEMM writes bf16 expert outputs only");
    // Weights in bf16: the model's values are on the bf16 grid, so nothing is lost.
    std::vector<float> gu(size_t(H) * 2 * I), down(size_t(I) * H);
    std::vector<uint16_t> gu_bits(size_t(local_) * gu.size()), down_bits(size_t(local_) * down.size());
    for (int e = 0; e < local_; ++e) {
      expert_weights(s, rank * local_ + e, gu.data(), down.data());
      for (size_t i = 0; i < gu.size(); ++i) gu_bits[size_t(e) * gu.size() + i] = ep::dtype::f32_to_bf16(gu[i]);
      for (size_t i = 0; i < down.size(); ++i) down_bits[size_t(e) * down.size() + i] = ep::dtype::f32_to_bf16(down[i]);
    }
    gate_up_ = Memory(gu_bits.size() * sizeof(uint16_t), true);
    down_ = Memory(down_bits.size() * sizeof(uint16_t), true);
    gate_up_.upload(gu_bits.data(), gate_up_.bytes());
    down_.upload(down_bits.data(), down_.bytes());
    const size_t rows = size_t(local_) * max_rows;
    hidden_ = Memory(rows * 2 * I * sizeof(uint16_t), true);
    act_ = Memory(rows * I * sizeof(uint16_t), true);
    counts_ = Memory(size_t(local_) * sizeof(int32_t), true);
    pointers_ = Memory(size_t(local_) * 3 * sizeof(void*), true);
    check_cublas(cublasCreate(&handle_), "cublasCreate");
    check_cublas(cublasSetStream(handle_, stream_), "cublasSetStream");
  }
  ~CudaGroupedGemm() override { cublasDestroy(handle_); }

  void run(const ExpertRows& r) override {
    const int H = s_.hidden, I = s_.intermediate;
    if (r.max_rows > max_rows_)
      raise(Status::internal, "CUDA grouped GEMM: " + std::to_string(r.max_rows) + " rows per expert, sized for " +
                                  std::to_string(max_rows_));
    const size_t elem = sizeof(uint16_t);
    auto row_of = [&](const void* base, int e, int width) {
      return static_cast<const uint8_t*>(base) + size_t(e) * r.max_rows * width * elem;
    };
    GroupedCall up, down;
    for (int e = 0; e < local_; ++e) {
      const int rows = r.counts[e];
      if (rows < 0 || rows > r.max_rows)
        raise(Status::internal, "CUDA grouped GEMM: expert " + std::to_string(e) + " has " + std::to_string(rows) +
                                    " rows, outside [0, " + std::to_string(r.max_rows) + "]");
      if (rows == 0) continue;
      const auto* w_up = static_cast<const uint8_t*>(gate_up_.get()) + size_t(e) * H * 2 * I * elem;
      const auto* w_down = static_cast<const uint8_t*>(down_.get()) + size_t(e) * I * H * elem;
      up.add(w_up, row_of(r.expert_x, e, H), const_cast<uint8_t*>(row_of(hidden_.get(), e, 2 * I)), rows, 2 * I, H);
      down.add(w_down, row_of(act_.get(), e, I), const_cast<uint8_t*>(row_of(r.expert_y, e, H)), rows, H, I);
    }
    if (up.m.empty()) return;
    // The SwiGLU kernel reads the counts of this run; the compacted layout of r's experts is the
    // layout of the batched buffers, so the host counts go to the device as they are.
    check_cuda(cudaMemcpyAsync(counts_.get(), r.counts, size_t(local_) * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync of the expert counts");
    grouped(up, "gate_up");
    launch_swiglu(hidden_.get(), act_.get(), static_cast<const int32_t*>(counts_.get()), local_, r.max_rows, I, stream_);
    grouped(down, "down");
  }

  std::string describe() const override { return "cuBLAS cublasGemmGroupedBatchedEx (bf16, fp32 compute), SwiGLU kernel"; }

 private:
  void grouped(GroupedCall& g, const char* what) {
    const size_t count = g.a.size();
    std::vector<const void*> ptrs(3 * count);
    for (size_t i = 0; i < count; ++i) {
      ptrs[i] = g.a[i];
      ptrs[count + i] = g.b[i];
      ptrs[2 * count + i] = g.c[i];
    }
    // From pageable memory: the copy is staged before cudaMemcpyAsync returns, so the next call may
    // reuse `ptrs`; stream order keeps the device array until the GEMM has read it.
    check_cuda(cudaMemcpyAsync(pointers_.get(), ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, stream_),
               "cudaMemcpyAsync of the grouped GEMM's pointer arrays");
    auto* dev = static_cast<void**>(pointers_.get());
    check_cublas(cublasGemmGroupedBatchedEx(handle_, g.trans.data(), g.trans.data(), g.m.data(), g.n.data(), g.k.data(),
                                            g.alpha.data(), const_cast<const void* const*>(dev), CUDA_R_16BF,
                                            g.lda.data(), const_cast<const void* const*>(dev + count), CUDA_R_16BF,
                                            g.ldb.data(), g.beta.data(), dev + 2 * count, CUDA_R_16BF, g.ldc.data(),
                                            int(count), g.group_size.data(), CUBLAS_COMPUTE_32F),
                 (std::string("cublasGemmGroupedBatchedEx (") + what + ")").c_str());
  }

  LayerShape s_;
  int local_, max_rows_;
  cudaStream_t stream_;
  cublasHandle_t handle_ = nullptr;
  Memory gate_up_, down_, hidden_, act_, counts_, pointers_;
};

}  // namespace

std::unique_ptr<GroupedGemm> make_cuda_grouped_gemm(const LayerShape& shape, int rank, int max_rows, void* stream) {
  return std::make_unique<CudaGroupedGemm>(shape, rank, max_rows, stream);
}

}  // namespace ferry::moe
#endif
