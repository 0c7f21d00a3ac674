// The CUDA backend between real processes sharing one GPU, over libfabric tcp and shm with
// host-staged (pinned, mapped) buffers, and through CUDA IPC (device memory of the peers written
// directly, no engine): every rank regenerates every rank's inputs from the seed,
// checks every count and byte of its dispatch output against the reference, runs the reference's
// expert model, and checks combine within the output dtype's tolerance. Outputs are poisoned before
// every step. Also: bad input fails the receive call (naming the token on the bad rank, the rank on
// its peers), and a step captured once in a CUDA graph replays 100 times with fresh inputs.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <string>

#include "csrc/backend.h"
#include "csrc/cuda/cuda_check.h"
#include "csrc/cuda/memory.h"
#include "csrc/dtype.h"
#include "csrc/reference.h"
#include "tests/common/a2a_case.h"
#include "tests/common/cuda_copy.h"
#include "tests/common/multiprocess.h"
#include "tests/cuda/gpu.h"
#include "transfer_engine/error.h"

namespace ferry::ep {
namespace {

using cuda::check_cuda;
using cuda::DeviceBuffer;
using testing::download;
using testing::upload;

using Case = testing::A2aCase;

// The case every test here starts from: fp8 with block scales, aligned expert rows and a small private
// region (so the overflow path runs too), three steps back to back.
Case cuda_case() {
  return {.num_experts = 8, .top_k = 4, .max_tokens = 48, .hidden = 2048, .in_dtype = FERRY_FP8_E4M3,
          .out_dtype = FERRY_BF16, .scale_block = 128, .expert_alignment = 4, .private_tokens = 12, .steps = 3,
          .launch_timeout_ms = 150000};
}

ferry_a2a_config_t config_of(const Case& c, int rank) { return testing::config_of(c, rank, FERRY_DEVICE_CUDA); }


// One rank's device buffers for a config: inputs sized for max_tokens, the batched outputs.
struct RankBuffers {
  Layout l;
  size_t rows;
  int scale_layout;  // of expert_scale (ferry_scale_layout_t)
  DeviceBuffer x, x_scale, indices, weights, bound_m, counts, expert_x, expert_scale, expert_y, out, src_token, per_rank;
  bool quantize = false, round_scale = false;  // this step's input: bf16 that dispatch casts
  RankBuffers(const Layout& layout, int out_scale_layout)
      : l(layout),
        rows(size_t(l.experts_per_rank) * l.max_rows_per_expert),
        scale_layout(out_scale_layout),
        x(size_t(l.max_tokens) * std::max<uint64_t>(l.payload_bytes, uint64_t(l.hidden) * 2)),
        x_scale(size_t(l.max_tokens) * l.num_scales * 4 + 4),
        indices(size_t(l.max_tokens) * l.top_k * 4),
        weights(size_t(l.max_tokens) * l.top_k * 4),
        bound_m(4),
        counts(size_t(l.experts_per_rank) * 4),
        expert_x(rows * l.payload_bytes),
        expert_scale(l.out_scale_buffer_bytes(scale_layout) + 4),
        expert_y(rows * l.out_row_bytes()),
        out(size_t(l.max_tokens) * l.out_row_bytes()),
        src_token(rows * 4),
        per_rank(size_t(l.experts_per_rank) * l.world_size * 4) {}

  void set_input(const reference::RankInput& in) {
    quantize = in.quantize;
    round_scale = in.round_scale;
    upload(x.get(), in.x.data(), in.x.size());
    upload(x_scale.get(), in.x_scale.data(), in.x_scale.size() * 4);
    upload(indices.get(), in.indices.data(), in.indices.size() * 4);
    upload(weights.get(), in.weights.data(), in.weights.size() * 4);
    upload(bound_m.get(), &in.num_tokens, 4);
  }
  void poison_outputs() {
    check_cuda(cudaMemset(counts.get(), 0xee, counts.bytes()), "poison");
    check_cuda(cudaMemset(expert_x.get(), 0xee, expert_x.bytes()), "poison");
    check_cuda(cudaMemset(expert_scale.get(), 0xee, expert_scale.bytes()), "poison");
    check_cuda(cudaMemset(out.get(), 0xee, out.bytes()), "poison");
  }
  ferry_dispatch_args_t dispatch_args(int num_tokens, int flags) const {
    ferry_dispatch_args_t d{};
    d.out_expert_num_tokens = counts.get<int32_t>();
    d.out_expert_x = expert_x.get();
    d.out_expert_x_scale = l.num_scales ? expert_scale.get<float>() : nullptr;
    d.dp_x = x.get();
    d.dp_x_scale = l.num_scales && !quantize ? x_scale.get<float>() : nullptr;
    d.indices = indices.get<int32_t>();
    d.weights = l.weights_at_combine ? nullptr : weights.get<float>();  // at combine: not read
    d.bound_m = bound_m.get<int32_t>();
    d.num_tokens = num_tokens;
    d.flags = flags;
    d.quantize = quantize ? FERRY_QUANTIZE_FP8_BLOCK : FERRY_QUANTIZE_NONE;
    d.round_scale = round_scale ? 1 : 0;
    d.out_scale_layout = ferry_scale_layout_t(scale_layout);
    d.out_expert_src_token = src_token.get<int32_t>();
    d.out_expert_num_tokens_per_rank = per_rank.get<int32_t>();
    return d;
  }
  // The received scales (downloaded) and as the row-major fp32 the expert model reads.
  std::vector<uint8_t> scale_bytes() const { return download<uint8_t>(expert_scale.get(), l.out_scale_buffer_bytes(scale_layout)); }
  std::vector<float> scale_rows(const ferry_a2a_config_t& config, const std::vector<uint8_t>& bytes) const {
    if (l.num_scales == 0) return {};
    if (scale_layout != kScaleRowMajor) return reference::scales_as_rows(config, scale_layout, bytes.data());
    std::vector<float> rows_f32(bytes.size() / 4);
    std::memcpy(rows_f32.data(), bytes.data(), rows_f32.size() * 4);
    return rows_f32;
  }
  ferry_combine_args_t combine_args(int num_tokens, int flags, const void* y) const {
    ferry_combine_args_t cb{};
    cb.out_tokens = out.get();
    cb.indices = indices.get<int32_t>();
    cb.weights = weights.get<float>();
    cb.expert_y = y;
    cb.bound_m = bound_m.get<int32_t>();
    cb.num_tokens = num_tokens;
    cb.flags = flags;
    return cb;
  }
};

void run_rank(te::Bootstrap& bootstrap, const Case& c) {
  check_cuda(cudaSetDevice(0), "cudaSetDevice");
  const ferry_a2a_config_t cfg = config_of(c, bootstrap.rank());
  const Layout l = make_layout(cfg);
  auto backend = make_cuda_backend(cfg, bootstrap);
  RankBuffers b(l, c.out_scale_layout);
  cuda::Stream stream(/*blocking=*/true);
  testing::HalfStepCaller caller(c, l.rank);

  for (int step = 0; step < c.steps; ++step) {
    const auto inputs = reference::generate_all(cfg, testing::step_spec(c, step));
    const reference::RankInput& in = inputs[l.rank];
    b.set_input(in);
    b.poison_outputs();
    caller.call([&](int flags) { backend->dispatch(b.dispatch_args(in.num_tokens, flags), stream.get()); });
    const auto counts = download<int32_t>(b.counts.get(), l.experts_per_rank);
    const auto x = download<uint8_t>(b.expert_x.get(), b.expert_x.bytes());
    const auto xs = b.scale_bytes();
    const auto want = reference::dispatch(cfg, inputs, l.rank);
    const std::string diff = reference::compare_dispatch(cfg, want, counts.data(), x.data(),
                                                         reinterpret_cast<const float*>(xs.data()), c.out_scale_layout);
    ASSERT_TRUE(diff.empty()) << "rank " << l.rank << " step " << step << "\n" << diff;
    const std::string sources =
        reference::compare_sources(cfg, want, download<int32_t>(b.src_token.get(), b.rows).data(),
                                   download<int32_t>(b.per_rank.get(), size_t(l.experts_per_rank) * l.world_size).data());
    ASSERT_TRUE(sources.empty()) << "rank " << l.rank << " step " << step << "\n" << sources;

    std::vector<uint8_t> y(b.rows * l.out_row_bytes(), 0);
    const auto scale_rows = b.scale_rows(cfg, xs);
    reference::apply_experts(l, counts.data(), x.data(), l.num_scales ? scale_rows.data() : nullptr, y.data());
    upload(b.expert_y.get(), y.data(), y.size());
    caller.call(
        [&](int flags) { backend->combine(b.combine_args(in.num_tokens, flags, b.expert_y.get()), stream.get()); });
    const auto out = download<uint8_t>(b.out.get(), size_t(in.num_tokens) * l.out_row_bytes());
    const std::string cdiff =
        reference::compare_combine(cfg, reference::combine_standard(cfg, in),
                                   reference::combine_magnitude_standard(cfg, in), out.data(), in.num_tokens);
    ASSERT_TRUE(cdiff.empty()) << "rank " << l.rank << " step " << step << "\n" << cdiff;
  }
  // The last step's traffic: with every token routed to several ranks, some records crossed the network.
  const ferry_a2a_stats_t stats = backend->stats();
  EXPECT_GT(stats.dispatch_records_sent, 0u) << "rank " << l.rank;
  EXPECT_GT(stats.combine_bytes_sent, 0u) << "rank " << l.rank;
}

// The backend takes its paths from the environment: CUDA IPC or not, and which node each rank is on.
testing::LaunchOptions cuda_launch_options(const Case& c) {
  testing::LaunchOptions opts = testing::launch_options(c);
  opts.env["FERRY_CUDA_IPC"] = c.ipc ? "1" : "0";
  if (c.nodes > 0)
    opts.rank_env = [c](int rank) {
      return std::map<std::string, std::string>{{"FERRY_NODE_ID", "node" + std::to_string(testing::node_of(c, rank))}};
    };
  return opts;
}

// Same-node peers through CUDA IPC. The provider does not exist: the engine must not be involved at all.
Case ipc_case(Case c) {
  c.ipc = true;
  c.provider = "no-such-provider";
  return c;
}

// Peers on the same node through CUDA IPC, the others through the engine (host-staged over c.provider).
Case mixed_case(Case c, int nodes) {
  c.ipc = true;
  c.nodes = nodes;
  return c;
}

// A mixed job says so on rank 0's stderr: the test must not pass by taking one path for everything.
void expect_mixed_paths(const std::vector<testing::RankResult>& results) {
  ASSERT_FALSE(results.empty());
  EXPECT_NE(results[0].output.find("the others through the transfer engine"), std::string::npos)
      << "rank 0 did not report a mixed CUDA IPC / engine job:\n" << results[0].output;
}

void run_case(const Case& c) {
  const testing::LaunchOptions opts = cuda_launch_options(c);
  const auto results = testing::run_ranks(opts, [&](te::Bootstrap& b) { run_rank(b, c); });
  testing::expect_all_ok(results);
  if (c.ipc && c.nodes > 1) expect_mixed_paths(results);
}

class CudaBackend : public ::testing::Test {
 protected:
  void SetUp() override { FERRY_REQUIRE_GPU(); }
};

TEST_F(CudaBackend, TwoRanksOverTcpMatchTheReference) {
  Case c = cuda_case();
  run_case(c);
}

TEST_F(CudaBackend, FourRanksOverShmWithSplitHalvesAndSkewedRanks) {
  Case c = cuda_case();
  c.world_size = 4;
  c.num_experts = 16;
  c.provider = "shm";
  c.split = true;
  c.max_skew_ms = 20;
  c.spec.routing = reference::Routing::zipf;
  c.spec.drop_fraction = 0.2;
  c.spec.vary_tokens = true;
  run_case(c);
}

TEST_F(CudaBackend, EightRanksTop8Hidden7168OverTcp) {
  Case c = cuda_case();
  c.world_size = 8;
  c.num_experts = 32;
  c.top_k = 8;
  c.max_tokens = 16;
  c.hidden = 7168;
  c.private_tokens = 4;
  c.steps = 2;
  run_case(c);
}

TEST_F(CudaBackend, Bf16InF16OutHidden4096OverTcp) {
  Case c = cuda_case();
  c.world_size = 4;
  c.num_experts = 8;
  c.in_dtype = FERRY_BF16;
  c.scale_block = 0;
  c.out_dtype = FERRY_F16;
  c.hidden = 4096;
  c.expert_alignment = 1;
  c.private_tokens = -1;
  run_case(c);
}

// Quantize on dispatch: bf16 tokens cast to fp8 and block scales by the pack kernel, on the engine
// path (host-staged shm), through CUDA IPC, and on two emulated nodes (both at once).
Case quantize_case() {
  Case c = cuda_case();
  c.world_size = 4;
  c.num_experts = 16;
  c.top_k = 8;
  c.max_tokens = 32;
  c.hidden = 7168;
  c.expert_alignment = 1;
  c.private_tokens = -1;
  c.out_scale_layout = FERRY_SCALE_UE8M0_COLUMN_MAJOR;
  c.spec.quantize = true;
  c.spec.round_scale = reference::RoundScale::all;
  c.spec.drop_fraction = 0.1;
  return c;
}

TEST_F(CudaBackend, QuantizeOnDispatchFourRanksOverShmWithUe8m0Scales) {
  Case c = quantize_case();
  c.provider = "shm";
  run_case(c);
}

TEST_F(CudaBackend, QuantizeOnDispatchThroughCudaIpcWithSplitHalvesAndColumnMajorScales) {
  Case c = quantize_case();
  c.split = true;
  c.max_skew_ms = 10;
  c.out_scale_layout = FERRY_SCALE_COLUMN_MAJOR;
  c.spec.round_scale = reference::RoundScale::odd_groups;
  c.spec.zero_tokens_every = 3;
  run_case(ipc_case(c));
}

TEST_F(CudaBackend, QuantizeOnDispatchOnTwoNodesMixingCudaIpcAndTcp) { run_case(mixed_case(quantize_case(), 2)); }

// Weights at combine: every destination returns the expert rows, the source weighs them with the
// weights combine RECV gets (DeepEP's low-latency combine); through the engine, CUDA IPC and both.
Case weights_at_combine_case() {
  Case c = quantize_case();
  c.combine_weights = FERRY_WEIGHTS_AT_COMBINE;
  c.out_scale_layout = FERRY_SCALE_COLUMN_MAJOR;
  return c;
}

TEST_F(CudaBackend, WeightsAtCombineFourRanksOverShmWithSplitHalves) {
  Case c = weights_at_combine_case();
  c.provider = "shm";
  c.split = true;
  c.max_skew_ms = 10;
  c.private_tokens = 8;
  run_case(c);
}

TEST_F(CudaBackend, WeightsAtCombineThroughCudaIpc) { run_case(ipc_case(weights_at_combine_case())); }

TEST_F(CudaBackend, WeightsAtCombineOnTwoNodesMixingCudaIpcAndTcp) {
  run_case(mixed_case(weights_at_combine_case(), 2));
}

// An id outside [0, num_experts) fails the bad rank's receive call naming the token, and its peers'
// receive calls naming that rank; nothing waits for a deadline.
void run_invalid_expert_case(const Case& c) {
  const testing::LaunchOptions opts = cuda_launch_options(c);
  testing::expect_all_ok(testing::run_ranks(opts, [&](te::Bootstrap& bs) {
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    const ferry_a2a_config_t cfg = config_of(c, bs.rank());
    const Layout l = make_layout(cfg);
    auto backend = make_cuda_backend(cfg, bs);
    RankBuffers b(l, kScaleRowMajor);
    cuda::Stream stream(/*blocking=*/true);
    auto inputs = reference::generate_all(cfg, c.spec);
    reference::RankInput in = inputs[l.rank];
    if (l.rank == 1) in.indices[5 * l.top_k + 1] = 1000;
    b.set_input(in);
    const auto t0 = std::chrono::steady_clock::now();
    try {
      backend->dispatch(b.dispatch_args(in.num_tokens, FERRY_SEND_RECV), stream.get());
      ADD_FAILURE() << "rank " << l.rank << ": dispatch with an invalid expert id on rank 1 succeeded";
    } catch (const Error& e) {
      const std::string what = e.what();
      if (l.rank == 1) {
        EXPECT_EQ(e.status(), Status::invalid_argument) << what;
        EXPECT_NE(what.find("token 5"), std::string::npos) << what;
        EXPECT_NE(what.find("1000"), std::string::npos) << what;
      } else {
        EXPECT_NE(what.find("rank 1"), std::string::npos) << what;
      }
    }
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(c.timeout_ms / 2))
        << "rank " << l.rank << " waited for a deadline instead of failing at once";
    // Ranks leave together: a peer's dispatch writes to the failed rank must complete before its
    // process (and its NIC endpoint) goes away.
    bs.barrier(c.timeout_ms);
  }));
}

TEST_F(CudaBackend, InvalidExpertIdFailsTheReceiveCallOnEveryRank) {
  Case c = cuda_case();
  c.world_size = 3;
  c.num_experts = 6;
  run_invalid_expert_case(c);
}

// dispatch + combine captured once in a CUDA graph, replayed 100 times with fresh inputs (and a fresh
// device-side token count) in the same buffers: every replay equals the reference. The expert is the
// identity (expert_y = out_expert_x), so combine returns x[t] * sum_k w[t][k].
Case graph_case() {
  Case c = cuda_case();
  c.world_size = 2;
  c.num_experts = 8;
  c.in_dtype = FERRY_BF16;
  c.scale_block = 0;
  c.out_dtype = FERRY_BF16;
  c.expert_alignment = 1;
  c.max_tokens = 32;
  return c;
}

void run_graph_case(const Case& c) {
  const testing::LaunchOptions opts = cuda_launch_options(c);
  testing::expect_all_ok(testing::run_ranks(opts, [&](te::Bootstrap& bs) {
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    const ferry_a2a_config_t cfg = config_of(c, bs.rank());
    const Layout l = make_layout(cfg);
    auto backend = make_cuda_backend(cfg, bs);
    RankBuffers b(l, kScaleRowMajor);
    cuda::Stream stream(/*blocking=*/true);
    cudaGraph_t graph;
    check_cuda(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal), "begin capture");
    backend->dispatch(b.dispatch_args(l.max_tokens, FERRY_SEND_RECV), stream.get());
    backend->combine(b.combine_args(l.max_tokens, FERRY_SEND_RECV, b.expert_x.get()), stream.get());
    check_cuda(cudaStreamEndCapture(stream.get(), &graph), "end capture");
    cudaGraphExec_t exec;
    check_cuda(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    for (int replay = 0; replay < 100; ++replay) {
      reference::InputSpec spec;
      spec.seed = 500 + replay;
      spec.vary_tokens = true;
      spec.drop_fraction = replay % 4 == 0 ? 0.3 : 0.0;
      const auto inputs = reference::generate_all(cfg, spec);
      const reference::RankInput& in = inputs[l.rank];
      b.set_input(in);
      b.poison_outputs();
      check_cuda(cudaGraphLaunch(exec, stream.get()), "graph launch");
      check_cuda(cudaStreamSynchronize(stream.get()), "replay");
      const auto counts = download<int32_t>(b.counts.get(), l.experts_per_rank);
      const auto x = download<uint8_t>(b.expert_x.get(), b.expert_x.bytes());
      const std::string diff =
          reference::compare_dispatch(cfg, reference::dispatch(cfg, inputs, l.rank), counts.data(), x.data(), nullptr);
      ASSERT_TRUE(diff.empty()) << "rank " << l.rank << " replay " << replay << "\n" << diff;
      std::vector<float> want(size_t(in.num_tokens) * l.hidden), magnitude(want.size());
      for (int t = 0; t < in.num_tokens; ++t) {
        float w = 0, wabs = 0;
        for (int k = 0; k < l.top_k; ++k)
          if (in.indices[size_t(t) * l.top_k + k] >= 0) {
            w += in.weights[size_t(t) * l.top_k + k];
            wabs += std::fabs(in.weights[size_t(t) * l.top_k + k]);
          }
        for (int h = 0; h < l.hidden; ++h) {
          const float xv = dtype::load(in.x.data(), l.in_dtype, int64_t(t) * l.hidden + h);
          want[size_t(t) * l.hidden + h] = xv * w;
          magnitude[size_t(t) * l.hidden + h] = std::fabs(xv) * wabs;
        }
      }
      const auto out = download<uint8_t>(b.out.get(), size_t(in.num_tokens) * l.out_row_bytes());
      const std::string cdiff = reference::compare_combine(cfg, want, magnitude, out.data(), in.num_tokens);
      ASSERT_TRUE(cdiff.empty()) << "rank " << l.rank << " replay " << replay << "\n" << cdiff;
    }
    // An eager step after the replays still works: the proxy followed the device's step counter.
    const auto inputs = reference::generate_all(cfg, reference::InputSpec{});
    b.set_input(inputs[l.rank]);
    backend->dispatch(b.dispatch_args(inputs[l.rank].num_tokens, FERRY_SEND_RECV), stream.get());
    const auto counts = download<int32_t>(b.counts.get(), l.experts_per_rank);
    const auto x = download<uint8_t>(b.expert_x.get(), b.expert_x.bytes());
    EXPECT_EQ(reference::compare_dispatch(cfg, reference::dispatch(cfg, inputs, l.rank), counts.data(), x.data(), nullptr),
              "");
    backend->combine(b.combine_args(inputs[l.rank].num_tokens, FERRY_SEND_RECV, b.expert_x.get()), stream.get());
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }));
}

TEST_F(CudaBackend, GraphOfDispatchAndCombineReplays100TimesLikeEagerCalls) { run_graph_case(graph_case()); }

// ---- same-node peers through CUDA IPC: records and partials written straight into the peers' device
// memory, per-sender flags raised in it; the same bytes as the engine path.

TEST_F(CudaBackend, TwoRanksThroughCudaIpcMatchTheReference) { run_case(ipc_case(cuda_case())); }

TEST_F(CudaBackend, FourRanksThroughCudaIpcWithSplitHalvesAndSkewedRanks) {
  Case c = cuda_case();
  c.world_size = 4;
  c.num_experts = 16;
  c.split = true;
  c.max_skew_ms = 20;
  c.spec.routing = reference::Routing::zipf;
  c.spec.drop_fraction = 0.2;
  c.spec.vary_tokens = true;
  run_case(ipc_case(c));
}

TEST_F(CudaBackend, EightRanksTop8Hidden7168ThroughCudaIpc) {
  Case c = cuda_case();
  c.world_size = 8;
  c.num_experts = 32;
  c.top_k = 8;
  c.max_tokens = 16;
  c.hidden = 7168;
  c.private_tokens = 4;
  c.steps = 2;
  run_case(ipc_case(c));
}

// Twenty steps back to back with ranks of different speeds: a fast rank's next step never lands in a
// region a slow peer still reads (the epochs keep the steps apart).
TEST_F(CudaBackend, TwentyBackToBackStepsThroughCudaIpcWithSkewedRanks) {
  Case c = cuda_case();
  c.world_size = 4;
  c.num_experts = 16;
  c.max_tokens = 32;
  c.hidden = 1024;
  c.steps = 20;
  c.max_skew_ms = 10;
  c.spec.vary_tokens = true;
  c.spec.drop_fraction = 0.1;
  run_case(ipc_case(c));
}

TEST_F(CudaBackend, InvalidExpertIdThroughCudaIpcFailsTheReceiveCallOnEveryRank) {
  Case c = cuda_case();
  c.world_size = 3;
  c.num_experts = 6;
  run_invalid_expert_case(ipc_case(c));
}

TEST_F(CudaBackend, GraphReplaysThroughCudaIpcLikeEagerCalls) { run_graph_case(ipc_case(graph_case())); }

// ---- mixed jobs: ranks split into nodes; same-node peers through CUDA IPC (device regions of their
// own, since the engine's are host-staged here), the others through the engine. Every byte as before.

TEST_F(CudaBackend, FourRanksOnTwoNodesMixCudaIpcAndTcp) {
  Case c = cuda_case();
  c.world_size = 4;
  run_case(mixed_case(c, 2));
}

// Rank 2 is alone on its node: its only IPC peer is itself, every other peer is the engine's.
TEST_F(CudaBackend, ThreeRanksOnTwoUnevenNodesOverShm) {
  Case c = cuda_case();
  c.world_size = 3;
  c.num_experts = 9;
  c.provider = "shm";
  c.spec.vary_tokens = true;
  run_case(mixed_case(c, 2));
}

TEST_F(CudaBackend, SixRanksOnThreeNodesOverShmWithSplitHalvesAndSkewedRanks) {
  Case c = cuda_case();
  c.world_size = 6;
  c.num_experts = 12;
  c.provider = "shm";
  c.split = true;
  c.max_skew_ms = 20;
  c.spec.routing = reference::Routing::zipf;
  c.spec.drop_fraction = 0.2;
  c.spec.vary_tokens = true;
  run_case(mixed_case(c, 3));
}

TEST_F(CudaBackend, EightRanksOnTwoNodesTop8Hidden7168) {
  Case c = cuda_case();
  c.world_size = 8;
  c.num_experts = 32;
  c.top_k = 8;
  c.max_tokens = 16;
  c.hidden = 7168;
  c.steps = 2;
  c.provider = "shm";
  run_case(mixed_case(c, 2));
}

TEST_F(CudaBackend, TwentyBackToBackStepsOnTwoNodesWithSkewedRanks) {
  Case c = cuda_case();
  c.world_size = 4;
  c.num_experts = 16;
  c.max_tokens = 32;
  c.hidden = 1024;
  c.steps = 20;
  c.max_skew_ms = 10;
  c.provider = "shm";
  c.spec.vary_tokens = true;
  c.spec.drop_fraction = 0.1;
  run_case(mixed_case(c, 2));
}

TEST_F(CudaBackend, InvalidExpertIdOnTwoNodesFailsTheReceiveCallOnEveryRank) {
  Case c = cuda_case();
  c.world_size = 4;
  c.num_experts = 8;
  run_invalid_expert_case(mixed_case(c, 2));
}

TEST_F(CudaBackend, GraphReplaysOnTwoNodesLikeEagerCalls) {
  Case c = graph_case();
  c.world_size = 4;
  run_graph_case(mixed_case(c, 2));
}

// A peer that never dispatches: the receive call fails at its deadline naming that rank.
TEST_F(CudaBackend, MissingIpcPeerFailsTheReceiveCallNamingIt) {
  Case c = ipc_case(cuda_case());
  c.timeout_ms = 1000;
  const testing::LaunchOptions opts = cuda_launch_options(c);
  testing::expect_all_ok(testing::run_ranks(opts, [&](te::Bootstrap& bs) {
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    const ferry_a2a_config_t cfg = config_of(c, bs.rank());
    const Layout l = make_layout(cfg);
    auto backend = make_cuda_backend(cfg, bs);
    if (l.rank == 0) {
      RankBuffers b(l, kScaleRowMajor);
      cuda::Stream stream(/*blocking=*/true);
      const auto inputs = reference::generate_all(cfg, c.spec);
      b.set_input(inputs[0]);
      try {
        backend->dispatch(b.dispatch_args(inputs[0].num_tokens, FERRY_SEND_RECV), stream.get());
        ADD_FAILURE() << "dispatch completed without rank 1";
      } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::timeout) << e.what();
        EXPECT_NE(std::string(e.what()).find("by rank 1"), std::string::npos) << e.what();
      }
    }
    bs.barrier(c.launch_timeout_ms);
  }));
}

}  // namespace
}  // namespace ferry::ep
