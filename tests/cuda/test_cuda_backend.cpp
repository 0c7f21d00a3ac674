// The CUDA backend between real processes sharing one GPU, over libfabric tcp and shm with
// host-staged (pinned, mapped) buffers, and through CUDA IPC (device memory of the peers written
// directly, no engine), through the C API: every step checked as the host backend's are
// (tests/common/a2a_run.h: every count and byte of dispatch against the reference, combine within
// the output dtype's tolerance, accumulate, bound_m, nothing written past what the API allows, the
// stats), on device buffers poisoned before every step. Also: bad input fails the receive call (naming the token on the bad rank, the rank on
// its peers), and a step captured once in a CUDA graph replays 100 times with fresh inputs.
#include <gtest/gtest.h>

#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "csrc/backend.h"
#include "csrc/cuda/cuda_check.h"
#include "csrc/dtype.h"
#include "csrc/reference.h"
#include "tests/common/a2a_case.h"
#include "tests/common/a2a_run.h"
#include "tests/common/api_a2a.h"
#include "tests/common/multiprocess.h"
#include "tests/cuda/gpu.h"
#include "transfer_engine/error.h"

namespace ferry::ep {
namespace {

using cuda::check_cuda;

using Case = testing::A2aCase;

// The case every test here starts from: fp8 with block scales, aligned expert rows and a small private
// region (so the overflow path runs too), three steps back to back.
Case cuda_case() {
  return {.num_experts = 8, .top_k = 4, .max_tokens = 48, .hidden = 2048, .in_dtype = FERRY_FP8_E4M3,
          .out_dtype = FERRY_BF16, .scale_block = 128, .expert_alignment = 4, .private_tokens = 12, .steps = 3,
          .launch_timeout_ms = 150000};
}

ferry_a2a_config_t config_of(const Case& c, int rank) { return testing::config_of(c, rank, FERRY_DEVICE_CUDA); }

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

// Every step checked as the host backend's are (tests/common/a2a_run.h), through the C API.
void run_case(const Case& c) {
  const testing::LaunchOptions opts = cuda_launch_options(c);
  const auto results =
      testing::run_ranks(opts, [&](te::Bootstrap& b) { testing::run_rank(b, c, FERRY_DEVICE_CUDA); });
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

// ---- the combine and dispatch arguments the host backend's tests cover (tests/ep/test_a2a.cpp) ----

// accumulate adds into out_tokens; bound_m below num_tokens sends only the first *bound_m tokens
// (a third fewer, none of a single token) and leaves the other rows' bytes as they were.
TEST_F(CudaBackend, AccumulateIntoF32WithBoundMBelowNumTokensOverTcp) {
  Case c = cuda_case();
  c.world_size = 3;
  c.num_experts = 6;
  c.out_dtype = FERRY_F32;
  c.accumulate = true;
  c.bound_m = true;
  c.spec.vary_tokens = true;
  run_case(c);
}

TEST_F(CudaBackend, AccumulateIntoBf16WithBoundMThroughCudaIpcWithSplitHalvesAndSkewedRanks) {
  Case c = cuda_case();
  c.world_size = 4;
  c.num_experts = 16;
  c.accumulate = true;
  c.bound_m = true;
  c.split = true;
  c.max_skew_ms = 10;
  c.spec.zero_tokens_every = 2;
  c.spec.drop_fraction = 0.3;
  run_case(ipc_case(c));
}

TEST_F(CudaBackend, RanksWithZeroTokensAndDroppedRoutesOverShm) {
  Case c = cuda_case();
  c.world_size = 4;
  c.top_k = 3;
  c.provider = "shm";
  c.spec.zero_tokens_every = 2;
  c.spec.drop_fraction = 0.3;
  run_case(c);
}

// Every record of the run travels after the counts (no private region), all to one expert's rank.
TEST_F(CudaBackend, AllTokensToOneExpertWithNoPrivateRegionOverShm) {
  Case c = cuda_case();
  c.world_size = 4;
  c.private_tokens = 0;
  c.provider = "shm";
  c.spec.routing = reference::Routing::one_expert;
  run_case(c);
}

TEST_F(CudaBackend, WeightsAtCombineAccumulatingF32WithBoundMOnTwoNodes) {
  Case c = weights_at_combine_case();
  c.out_dtype = FERRY_F32;
  c.accumulate = true;
  c.bound_m = true;
  c.spec.zero_tokens_every = 3;
  run_case(mixed_case(c, 2));
}

// Scales given with the tokens (no quantize) land in each layout the receiver asks for.
TEST_F(CudaBackend, GivenScalesInColumnMajorAndUe8m0LayoutsOverTcp) {
  for (const ferry_scale_layout_t layout : {FERRY_SCALE_COLUMN_MAJOR, FERRY_SCALE_UE8M0_COLUMN_MAJOR}) {
    Case c = cuda_case();
    c.out_scale_layout = layout;
    c.steps = 2;
    SCOPED_TRACE("out_scale_layout " + std::to_string(int(layout)));
    run_case(c);
  }
}

TEST_F(CudaBackend, QuantizeOnDispatchSmallestAndLargestScaleBlocksWithRowMajorScales) {
  for (const int block : {FERRY_QUANTIZE_MIN_BLOCK, FERRY_QUANTIZE_MAX_BLOCK}) {
    Case c = quantize_case();
    c.world_size = 2;
    c.num_experts = 8;
    c.top_k = 4;
    c.hidden = 768;
    c.scale_block = block;
    c.out_scale_layout = FERRY_SCALE_ROW_MAJOR;
    c.spec.round_scale = reference::RoundScale::odd_groups;
    SCOPED_TRACE("scale_block " + std::to_string(block));
    run_case(c);
  }
}

TEST_F(CudaBackend, EveryInputAndOutputDtypeOverTcp) {
  for (const ferry_dtype_t in : {FERRY_BF16, FERRY_F16, FERRY_F32, FERRY_FP8_E4M3}) {
    for (const ferry_dtype_t out : {FERRY_BF16, FERRY_F16, FERRY_F32}) {
      Case c = cuda_case();
      c.in_dtype = in;
      c.out_dtype = out;
      c.scale_block = in == FERRY_FP8_E4M3 ? 32 : 0;
      c.max_tokens = 8;
      c.hidden = 256;
      c.steps = 1;
      SCOPED_TRACE("in " + std::to_string(in) + " out " + std::to_string(out));
      run_case(c);
    }
  }
}

// An id outside [0, num_experts) fails the bad rank's receive call naming the token, and its peers'
// receive calls naming that rank; nothing waits for a deadline.
void run_invalid_expert_case(const Case& c) {
  const testing::LaunchOptions opts = cuda_launch_options(c);
  testing::expect_all_ok(testing::run_ranks(opts, [&](te::Bootstrap& bs) {
    const ferry_a2a_config_t cfg = config_of(c, bs.rank());
    const Layout l = make_layout(cfg);
    testing::ApiA2a a2a(cfg, bs);
    const auto memory = testing::make_rank_memory(FERRY_DEVICE_CUDA);
    testing::StepBuffers b(*memory, cfg, c);
    auto inputs = reference::generate_all(cfg, c.spec);
    reference::RankInput in = inputs[l.rank];
    if (l.rank == 1) in.indices[5 * l.top_k + 1] = 1000;
    b.set_input(in);
    const auto t0 = std::chrono::steady_clock::now();
    try {
      a2a.dispatch(b.dispatch_args(FERRY_SEND_RECV), memory->stream());
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

// Combine of the identity expert: x[t] * sum_k w[t][k] over t's routes, and its magnitude.
std::pair<std::vector<float>, std::vector<float>> identity_combine(const Layout& l, const reference::RankInput& in) {
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
  return {want, magnitude};
}

void run_graph_case(const Case& c) {
  const testing::LaunchOptions opts = cuda_launch_options(c);
  testing::expect_all_ok(testing::run_ranks(opts, [&](te::Bootstrap& bs) {
    const ferry_a2a_config_t cfg = config_of(c, bs.rank());
    const Layout l = make_layout(cfg);
    testing::ApiA2a a2a(cfg, bs);
    const auto memory = testing::make_rank_memory(FERRY_DEVICE_CUDA);
    testing::StepBuffers b(*memory, cfg, c);
    const auto stream = static_cast<cudaStream_t>(memory->stream());
    // Captured for max_tokens; each replay's count comes from bound_m on the device.
    b.set_input(reference::generate_input(cfg, reference::InputSpec{}, l.rank), l.max_tokens);
    cudaGraph_t graph;
    check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
    a2a.dispatch(b.dispatch_args(FERRY_SEND_RECV), stream);
    a2a.combine(b.combine_args(FERRY_SEND_RECV, b.expert_x()), stream);
    check_cuda(cudaStreamEndCapture(stream, &graph), "end capture");
    cudaGraphExec_t exec;
    check_cuda(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    for (int replay = 0; replay < 100; ++replay) {
      reference::InputSpec spec;
      spec.seed = 500 + replay;
      spec.vary_tokens = true;
      spec.drop_fraction = replay % 4 == 0 ? 0.3 : 0.0;
      const auto inputs = reference::generate_all(cfg, spec);
      const reference::RankInput& in = inputs[l.rank];
      b.set_input(in, l.max_tokens);
      b.poison_outputs();
      check_cuda(cudaGraphLaunch(exec, stream), "graph launch");
      check_cuda(cudaStreamSynchronize(stream), "replay");
      const std::string diff = b.check_dispatch(inputs);
      ASSERT_TRUE(diff.empty()) << "rank " << l.rank << " replay " << replay << "\n" << diff;
      const auto [want, magnitude] = identity_combine(l, in);
      const std::string cdiff = b.check_combine(want, magnitude, {});
      ASSERT_TRUE(cdiff.empty()) << "rank " << l.rank << " replay " << replay << "\n" << cdiff;
    }
    // An eager step after the replays still works: the proxy followed the device's step counter.
    const auto inputs = reference::generate_all(cfg, reference::InputSpec{});
    b.set_input(inputs[l.rank]);
    b.poison_outputs();
    a2a.dispatch(b.dispatch_args(FERRY_SEND_RECV), stream);
    EXPECT_EQ(b.check_dispatch(inputs), "") << "rank " << l.rank << ": the eager step after the replays";
    a2a.combine(b.combine_args(FERRY_SEND_RECV, b.expert_x()), stream);
    const auto [want, magnitude] = identity_combine(l, inputs[l.rank]);
    EXPECT_EQ(b.check_combine(want, magnitude, {}), "") << "rank " << l.rank << ": the eager step after the replays";
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
    const ferry_a2a_config_t cfg = config_of(c, bs.rank());
    testing::ApiA2a a2a(cfg, bs);
    if (bs.rank() == 0) {
      const auto memory = testing::make_rank_memory(FERRY_DEVICE_CUDA);
      testing::StepBuffers b(*memory, cfg, c);
      b.set_input(reference::generate_input(cfg, c.spec, 0));
      try {
        a2a.dispatch(b.dispatch_args(FERRY_SEND_RECV), memory->stream());
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
