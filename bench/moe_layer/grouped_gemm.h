// The experts' FFN over Ferry's expert-major batched layout (model.h): per local expert e, its
// counts[e] rows at e * max_rows_per_expert go through gate_up, SwiGLU and down into the same rows
// of expert_y. Host: fp32 tiles on a pool of threads sized to the cores the job leaves this rank;
// CUDA: two cublasGemmGroupedBatchedEx calls (one group per non-empty expert) around a SwiGLU kernel.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "bench/moe_layer/model.h"

namespace ferry::moe {

// One micro-batch's batched layout, in the memory of the backend (host or device).
struct ExpertRows {
  const int32_t* counts = nullptr;  // [experts_per_rank] rows per local expert, HOST memory
  const void* expert_x = nullptr;   // [experts_per_rank * max_rows][hidden] bf16
  void* expert_y = nullptr;         // [experts_per_rank * max_rows][hidden] out_dtype
  int max_rows = 0;                 // rows per expert slot (ferry_buffer_sizes_t::max_rows_per_expert)
};

class GroupedGemm {
 public:
  virtual ~GroupedGemm() = default;
  // Host: returns when expert_y is written. CUDA: enqueued on the stream it was made with; rows
  // must not exceed the max_rows it was made for.
  virtual void run(const ExpertRows& rows) = 0;
  virtual std::string describe() const = 0;
};

// Floating-point operations of one run: 2 * rows * hidden * 3 * intermediate.
double grouped_gemm_flops(const LayerShape& shape, const int32_t* counts);

// `threads` >= 1 (the calling thread is one of them).
std::unique_ptr<GroupedGemm> make_host_grouped_gemm(const LayerShape& shape, int rank, int threads);
// max_rows: the largest max_rows of any ExpertRows it will run (sizes its scratch). stream: a
// cudaStream_t. Throws Status::unsupported when built without cuBLAS.
std::unique_ptr<GroupedGemm> make_cuda_grouped_gemm(const LayerShape& shape, int rank, int max_rows, void* stream);

// Threads for the host GEMM when the user gives none: the CPUs this process may use, shared by the
// `local_ranks` ranks of this host, less one per rank for Ferry's engine workers; at least 1.
int default_gemm_threads(int local_ranks);

// C[m][n] = A[m][k] * B[k][n] (row-major, leading dimensions lda/ldb/ldc), fp32, blocked so that a
// block of B stays in cache while A's rows stream by.
void sgemm_strided(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc);

}  // namespace ferry::moe
