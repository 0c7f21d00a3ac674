// The host backend's grouped GEMM: tiles of (expert, column block) on a small pool of threads that
// sleep between runs, so the cores stay free for Ferry's engine worker while no GEMM runs.
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "bench/moe_layer/grouped_gemm.h"
#include "csrc/dtype.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FERRY_GEMM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FERRY_GEMM_CLONES
#endif

namespace ferry::moe {

namespace {

constexpr int kBlockK = 128;
constexpr int kBlockN = 256;

// row[j] += a * b[j]: the loop GCC vectorizes; one clone per ISA.
FERRY_GEMM_CLONES void axpy(float* row, float a, const float* b, int n) {
  for (int j = 0; j < n; ++j) row[j] += a * b[j];
}

// Runs tasks 0..n-1 on the pool and the calling thread; returns when all are done.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int size() const { return int(workers_.size()) + 1; }

  void run(int num_tasks, const std::function<void(int)>& task) {
    if (workers_.empty() || num_tasks <= 1) {
      for (int i = 0; i < num_tasks; ++i) task(i);
      return;
    }
    {
      std::lock_guard lock(mutex_);
      task_ = &task;
      num_tasks_ = num_tasks;
      next_.store(0);
      pending_ = int(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    task_ = nullptr;
  }

 private:
  void drain() {
    for (int i; (i = next_.fetch_add(1)) < num_tasks_;) (*task_)(i);
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int num_tasks_ = 0;
  std::atomic<int> next_{0};
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

struct Tile {
  int expert;
  int col0, col1;
};

class HostGroupedGemm final : public GroupedGemm {
 public:
  HostGroupedGemm(const LayerShape& shape, int rank, int threads)
      : s_(shape), local_(shape.experts_per_rank()), pool_(std::max(1, threads)) {
    const int H = s_.hidden, I = s_.intermediate;
    gate_up_.resize(size_t(local_));
    down_.resize(size_t(local_));
    for (int e = 0; e < local_; ++e) {
      gate_up_[e].resize(size_t(H) * 2 * I);
      down_[e].resize(size_t(I) * H);
      expert_weights(s_, rank * local_ + e, gate_up_[e].data(), down_[e].data());
    }
  }

  void run(const ExpertRows& r) override {
    const int H = s_.hidden, I = s_.intermediate;
    const size_t rows = size_t(local_) * r.max_rows;
    if (x_.size() < rows * H) {
      x_.resize(rows * H);
      a_.resize(rows * I);
    }
    for (int e = 0; e < local_; ++e) {
      if (r.counts[e] < 0 || r.counts[e] > r.max_rows)
        raise(Status::internal, "grouped GEMM: expert " + std::to_string(e) + " has " + std::to_string(r.counts[e]) +
                                    " rows, outside [0, " + std::to_string(r.max_rows) + "]");
    }
    // Tiles of one phase: (expert, column block); experts without rows have none.
    auto tiles_of = [&](int cols) {
      std::vector<Tile> tiles;
      for (int e = 0; e < local_; ++e) {
        if (r.counts[e] == 0) continue;
        for (int c = 0; c < cols; c += kBlockN) tiles.push_back({e, c, std::min(cols, c + kBlockN)});
      }
      return tiles;
    };
    const auto* x_bits = static_cast<const uint16_t*>(r.expert_x);
    // The experts' rows in fp32, once, for every column block that reads them.
    std::vector<int> busy;
    for (int e = 0; e < local_; ++e)
      if (r.counts[e] > 0) busy.push_back(e);
    pool_.run(int(busy.size()), [&](int i) {
      const size_t row0 = size_t(busy[size_t(i)]) * r.max_rows;
      const size_t n = size_t(r.counts[busy[size_t(i)]]) * H;
      for (size_t k = 0; k < n; ++k) x_[row0 * H + k] = ep::dtype::bf16_to_f32(x_bits[row0 * H + k]);
    });
    // gate and up of a column block, then SwiGLU into a_ (bf16 values held in fp32).
    const std::vector<Tile> up_tiles = tiles_of(I);
    pool_.run(int(up_tiles.size()), [&](int i) {
      const Tile& t = up_tiles[size_t(i)];
      const int m = r.counts[t.expert], n = t.col1 - t.col0;
      const size_t row0 = size_t(t.expert) * r.max_rows;
      thread_local std::vector<float> g, u;
      g.resize(size_t(m) * n);
      u.resize(size_t(m) * n);
      const float* w = gate_up_[t.expert].data();
      sgemm_strided(m, n, H, &x_[row0 * H], H, w + t.col0, 2 * I, g.data(), n);
      sgemm_strided(m, n, H, &x_[row0 * H], H, w + I + t.col0, 2 * I, u.data(), n);
      for (int row = 0; row < m; ++row) {
        for (int j = 0; j < n; ++j) {
          const float gv = ep::dtype::round_to(ep::dtype::kBf16, g[size_t(row) * n + j]);
          const float uv = ep::dtype::round_to(ep::dtype::kBf16, u[size_t(row) * n + j]);
          const float silu = gv / (1.0f + std::exp(-gv));
          a_[(row0 + row) * I + t.col0 + j] = ep::dtype::round_to(ep::dtype::kBf16, silu * uv);
        }
      }
    });
    const std::vector<Tile> down_tiles = tiles_of(H);
    const size_t out_elem = size_t(ep::elem_bytes_of(s_.out_dtype));
    pool_.run(int(down_tiles.size()), [&](int i) {
      const Tile& t = down_tiles[size_t(i)];
      const int m = r.counts[t.expert], n = t.col1 - t.col0;
      const size_t row0 = size_t(t.expert) * r.max_rows;
      thread_local std::vector<float> y;
      y.resize(size_t(m) * n);
      sgemm_strided(m, n, I, &a_[row0 * I], I, down_[t.expert].data() + t.col0, H, y.data(), n);
      for (int row = 0; row < m; ++row) {
        void* dst = static_cast<uint8_t*>(r.expert_y) + ((row0 + row) * H + t.col0) * out_elem;
        ep::dtype::store_row(dst, s_.out_dtype, &y[size_t(row) * n], n);
      }
    });
  }

  std::string describe() const override {
    return tools::format("host fp32 tiles, %d thread%s", pool_.size(), pool_.size() == 1 ? "" : "s");
  }

 private:
  LayerShape s_;
  int local_;
  std::vector<std::vector<float>> gate_up_, down_;
  std::vector<float> x_, a_;
  Pool pool_;
};

}  // namespace

void sgemm_strided(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  for (int i = 0; i < m; ++i) std::fill(c + size_t(i) * ldc, c + size_t(i) * ldc + n, 0.0f);
  for (int k0 = 0; k0 < k; k0 += kBlockK) {
    const int k1 = std::min(k, k0 + kBlockK);
    for (int n0 = 0; n0 < n; n0 += kBlockN) {
      const int nb = std::min(n, n0 + kBlockN) - n0;
      for (int i = 0; i < m; ++i) {
        float* crow = c + size_t(i) * ldc + n0;
        for (int kk = k0; kk < k1; ++kk) {
          const float aik = a[size_t(i) * lda + kk];
          axpy(crow, aik, b + size_t(kk) * ldb + n0, nb);
        }
      }
    }
  }
}

double grouped_gemm_flops(const LayerShape& s, const int32_t* counts) {
  double rows = 0;
  for (int e = 0; e < s.experts_per_rank(); ++e) rows += counts[e];
  return 2.0 * rows * s.hidden * 3.0 * s.intermediate;
}

std::unique_ptr<GroupedGemm> make_host_grouped_gemm(const LayerShape& shape, int rank, int threads) {
  return std::make_unique<HostGroupedGemm>(shape, rank, threads);
}

int default_gemm_threads(int local_ranks) {
  cpu_set_t set;
  CPU_ZERO(&set);
  int cpus = 1;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cpus = CPU_COUNT(&set);
  return std::max(1, cpus / std::max(1, local_ranks) - 1);
}

#if !defined(FERRY_MOE_CUBLAS)
std::unique_ptr<GroupedGemm> make_cuda_grouped_gemm(const LayerShape&, int, int, void*) {
  raise(Status::unsupported, "--backend cuda: this ferry-moe-layer was built without cuBLAS");
}
#endif

}  // namespace ferry::moe
