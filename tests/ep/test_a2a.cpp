// Dispatch and combine between real processes over libfabric (tcp, shm): every rank regenerates
// every rank's inputs from the seed, checks every count and byte of its dispatch output against the
// reference, computes expert_y with the reference's expert model, and checks combine within the
// output dtype's tolerance.
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <string>
#include <tuple>

#include "csrc/agreement.h"
#include "csrc/backend.h"
#include "csrc/host/pack.h"
#include "csrc/protocol.h"
#include "csrc/reference.h"
#include "tests/common/a2a_case.h"
#include "tests/common/a2a_run.h"
#include "tests/common/api_a2a.h"
#include "tests/common/multiprocess.h"
#include "tests/common/protocol_host.h"
#include "transfer_engine/engine.h"
#include "transfer_engine/error.h"

namespace ferry::ep {
namespace {

using reference::Routing;

using Case = testing::A2aCase;

ferry_a2a_config_t config_of(const Case& c, int rank) { return testing::config_of(c, rank, FERRY_DEVICE_HOST); }

using testing::run_steps;

// One rank's whole run on the host backend (tests/common/a2a_run.h): every byte against the reference.
void run_rank(te::Bootstrap& bootstrap, const Case& c,
              const std::function<void(int rank, ferry_a2a_config_t&)>& own = {}) {
  testing::run_rank(bootstrap, c, FERRY_DEVICE_HOST, own);
}

void run_case(const Case& c) {
  testing::expect_all_ok(testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) { run_rank(b, c); }));
}

// ---- scale ---------------------------------------------------------------------------------

TEST(AllToAll, Ep2UniformRoutingMatchesTheReference) {
  Case c;
  run_case(c);
}

TEST(AllToAll, Ep4OverShm) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  c.provider = "shm";
  run_case(c);
}

TEST(AllToAll, Ep8SeveralExpertsPerRankTop8) {
  Case c;
  c.world_size = 8;
  c.num_experts = 32;
  c.top_k = 8;
  c.max_tokens = 12;
  c.hidden = 256;
  run_case(c);
}

TEST(AllToAll, Ep16OneExpertPerRankHidden2048) {
  Case c;
  c.world_size = 16;
  c.num_experts = 16;
  c.top_k = 4;
  c.max_tokens = 6;
  c.hidden = 2048;
  run_case(c);
}

TEST(AllToAll, Ep64TinyShapesFinishQuickly) {
  Case c;
  c.world_size = 64;
  c.num_experts = 128;
  c.top_k = 4;
  c.max_tokens = 4;
  c.hidden = 64;
  c.timeout_ms = 50000;
  run_case(c);
}

// ---- routing -------------------------------------------------------------------------------

TEST(AllToAll, AllTokensToOneExpert) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  c.top_k = 1;
  c.spec.routing = Routing::one_expert;
  run_case(c);
}

TEST(AllToAll, ZipfSkewedRoutingWithAlignment) {
  Case c;
  c.world_size = 4;
  c.num_experts = 16;
  c.top_k = 4;
  c.expert_alignment = 8;
  c.spec.routing = Routing::zipf;
  run_case(c);
}

TEST(AllToAll, RanksWithZeroTokensAndDroppedRoutes) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  c.top_k = 3;
  c.spec.zero_tokens_every = 2;
  c.spec.drop_fraction = 0.3;
  c.steps = 2;
  run_case(c);
}

TEST(AllToAll, VaryingTokenCountsOverShm) {
  Case c;
  c.world_size = 3;
  c.num_experts = 6;
  c.provider = "shm";
  c.spec.vary_tokens = true;
  c.steps = 3;
  run_case(c);
}

// ---- shapes and types ------------------------------------------------------------------------

TEST(AllToAll, DeepSeekShapeFp8WithBlockScales) {
  Case c;
  c.world_size = 4;
  c.num_experts = 16;
  c.top_k = 8;
  c.max_tokens = 8;
  c.hidden = 7168;
  c.in_dtype = FERRY_FP8_E4M3;
  c.scale_block = 128;
  c.out_dtype = FERRY_BF16;
  run_case(c);
}

TEST(AllToAll, EveryInputAndOutputDtype) {
  for (ferry_dtype_t in : {FERRY_BF16, FERRY_F16, FERRY_F32, FERRY_FP8_E4M3}) {
    for (ferry_dtype_t out : {FERRY_BF16, FERRY_F16, FERRY_F32}) {
      Case c;
      c.in_dtype = in;
      c.out_dtype = out;
      c.scale_block = in == FERRY_FP8_E4M3 ? 32 : 0;
      c.max_tokens = 8;
      SCOPED_TRACE("in " + std::to_string(in) + " out " + std::to_string(out));
      run_case(c);
    }
  }
}

TEST(AllToAll, CombineAccumulatesIntoOutTokens) {
  Case c;
  c.out_dtype = FERRY_F32;
  c.accumulate = true;
  run_case(c);
}

// bound_m below num_tokens: only the first *bound_m tokens travel, and combine adds into their rows
// and leaves the others' bytes as they were.
TEST(AllToAll, BoundMBelowNumTokensSendsThoseTokensAndCombineLeavesTheRest) {
  Case c;
  c.world_size = 3;
  c.num_experts = 6;
  c.expert_alignment = 4;
  c.accumulate = true;
  c.bound_m = true;
  c.steps = 3;
  c.spec.vary_tokens = true;
  run_case(c);
}

// ---- quantize on dispatch ------------------------------------------------------------------------
// bf16 tokens in; what travels and lands in out_expert_x is fp8 e4m3 with one fp32 scale per block,
// computed by Ferry while it packs. Every byte (values, scales, padding) against the reference's
// own cast; combine runs the experts on the cast values. The inputs have blocks of magnitudes
// 2^-20 .. 2^20, zero blocks, -0 and infinities (reference.h, InputSpec::quantize).

Case quantize_case() {
  Case c;
  c.in_dtype = FERRY_FP8_E4M3;
  c.scale_block = 128;
  c.hidden = 1024;
  c.spec.quantize = true;
  return c;
}

TEST(QuantizeOnDispatch, Ep2OverTcpIsTheReferenceCastByteForByte) { run_case(quantize_case()); }

TEST(QuantizeOnDispatch, Ep4OverShmWithScalesRoundedToPowersOfTwo) {
  Case c = quantize_case();
  c.world_size = 4;
  c.num_experts = 8;
  c.top_k = 3;
  c.provider = "shm";
  c.spec.round_scale = reference::RoundScale::all;
  run_case(c);
}

TEST(QuantizeOnDispatch, RanksRoundTheirScalesOrNotEachForItself) {
  Case c = quantize_case();
  c.world_size = 4;
  c.num_experts = 8;
  c.spec.round_scale = reference::RoundScale::odd_groups;
  c.steps = 2;
  run_case(c);
}

TEST(QuantizeOnDispatch, ColumnMajorScalesWithPaddedExperts) {
  Case c = quantize_case();
  c.world_size = 4;
  c.num_experts = 8;
  c.expert_alignment = 3;
  c.out_scale_layout = FERRY_SCALE_COLUMN_MAJOR;
  run_case(c);
}

TEST(QuantizeOnDispatch, Ue8m0ScalesOfRoundedScalesWithAPartlyFilledLastWordOverShm) {
  Case c = quantize_case();
  c.world_size = 4;
  c.num_experts = 8;
  c.hidden = 640;  // 5 scales: two words, the second with three zero bytes
  c.provider = "shm";
  c.expert_alignment = 2;
  c.out_scale_layout = FERRY_SCALE_UE8M0_COLUMN_MAJOR;
  c.spec.round_scale = reference::RoundScale::all;
  run_case(c);
}

TEST(QuantizeOnDispatch, RanksWithZeroTokensAndDroppedRoutes) {
  Case c = quantize_case();
  c.world_size = 4;
  c.num_experts = 8;
  c.top_k = 3;
  c.spec.zero_tokens_every = 2;
  c.spec.drop_fraction = 0.3;
  c.steps = 2;
  run_case(c);
}

TEST(QuantizeOnDispatch, SendAndRecvSplitWithSkewedRanksOverShm) {
  Case c = quantize_case();
  c.world_size = 4;
  c.num_experts = 8;
  c.provider = "shm";
  c.split = true;
  c.max_skew_ms = 10;
  c.steps = 3;
  c.spec.vary_tokens = true;
  c.spec.round_scale = reference::RoundScale::odd_groups;
  run_case(c);
}

TEST(QuantizeOnDispatch, DeepEpDecodeShapeTop8Hidden7168WithUe8m0Scales) {
  Case c = quantize_case();
  c.world_size = 4;
  c.num_experts = 16;
  c.top_k = 8;
  c.max_tokens = 8;
  c.hidden = 7168;
  c.out_scale_layout = FERRY_SCALE_UE8M0_COLUMN_MAJOR;
  c.spec.round_scale = reference::RoundScale::all;
  run_case(c);
}

TEST(QuantizeOnDispatch, SmallestAndLargestScaleBlocks) {
  for (int block : {FERRY_QUANTIZE_MIN_BLOCK, FERRY_QUANTIZE_MAX_BLOCK}) {
    Case c = quantize_case();
    c.hidden = 768;
    c.scale_block = block;
    c.spec.round_scale = reference::RoundScale::odd_groups;
    SCOPED_TRACE("scale_block " + std::to_string(block));
    run_case(c);
  }
}

// ---- weights at combine -----------------------------------------------------------------------
// Dispatch carries no weights (NULL); every destination returns the token's expert rows and combine
// RECV sums them with the weights it is given (DeepEP's low-latency combine). Several experts per
// rank, so records carry several routes and slots several rows.

Case weights_at_combine_case() {
  Case c;
  c.world_size = 2;
  c.num_experts = 8;
  c.top_k = 4;
  c.combine_weights = FERRY_WEIGHTS_AT_COMBINE;
  return c;
}

TEST(WeightsAtCombine, Ep2OverTcpSumsEveryExpertRowWithTheCombinesWeights) { run_case(weights_at_combine_case()); }

TEST(WeightsAtCombine, Ep4Top8Of16ExpertsOverShm) {
  Case c = weights_at_combine_case();
  c.world_size = 4;
  c.num_experts = 16;
  c.top_k = 8;
  c.provider = "shm";
  run_case(c);
}

TEST(WeightsAtCombine, RanksWithZeroTokensDroppedRoutesAndAccumulatingF32) {
  Case c = weights_at_combine_case();
  c.world_size = 4;
  c.num_experts = 12;
  c.out_dtype = FERRY_F32;
  c.accumulate = true;
  c.spec.zero_tokens_every = 2;
  c.spec.drop_fraction = 0.3;
  c.steps = 2;
  run_case(c);
}

TEST(WeightsAtCombine, SplitHalvesBackToBackWithSkewedRanksAndASmallPrivateRegionOverShm) {
  Case c = weights_at_combine_case();
  c.world_size = 3;
  c.num_experts = 9;
  c.top_k = 5;
  c.provider = "shm";
  c.split = true;
  c.max_skew_ms = 10;
  c.private_tokens = 3;
  c.steps = 6;
  c.spec.vary_tokens = true;
  run_case(c);
}

TEST(WeightsAtCombine, WithQuantizeOnDispatchAndColumnMajorScalesAsDeepEpLowLatency) {
  Case c = quantize_case();
  c.world_size = 4;
  c.num_experts = 16;
  c.top_k = 6;
  c.combine_weights = FERRY_WEIGHTS_AT_COMBINE;
  c.out_scale_layout = FERRY_SCALE_COLUMN_MAJOR;
  c.spec.round_scale = reference::RoundScale::odd_groups;
  c.spec.drop_fraction = 0.1;
  run_case(c);
}

TEST(WeightsAtCombine, SlotsOfMoreThanAMegabyteTravelInPiecesOverTwoNics) {
  Case c = weights_at_combine_case();
  c.num_experts = 16;
  c.top_k = 8;
  c.max_tokens = 4;
  c.hidden = 65536;
  c.out_dtype = FERRY_F32;  // 256 KiB rows, four or more per record
  c.nets_per_rank = 2;
  run_case(c);
}

// ---- helper threads (FERRY_HOST_THREADS) ---------------------------------------------------------

// Rows of 32 KiB: packing, the combine sums and the receive sums each split their tokens or records
// into three parts on three threads (parts of at least 256 KiB); the bytes must not change.
Case host_threads_case() {
  Case c;
  c.world_size = 4;
  c.num_experts = 16;
  c.top_k = 6;
  c.max_tokens = 48;
  c.hidden = 16384;
  c.host_threads = 3;
  return c;
}

TEST(HostThreads, EveryByteMoverInThreePartsMatchesTheReference) { run_case(host_threads_case()); }

TEST(HostThreads, DataParallelGroupsAccumulatingF32OverShm) {
  Case c = host_threads_case();
  c.dp_size = 2;
  c.out_dtype = FERRY_F32;
  c.accumulate = true;
  c.provider = "shm";
  c.steps = 2;
  run_case(c);
}

TEST(HostThreads, QuantizeOnDispatchWithWeightsAtCombine) {
  Case c = host_threads_case();
  c.in_dtype = FERRY_FP8_E4M3;
  c.scale_block = 128;
  c.spec.quantize = true;
  c.combine_weights = FERRY_WEIGHTS_AT_COMBINE;
  c.spec.drop_fraction = 0.1;
  run_case(c);
}

// ---- protocol paths ----------------------------------------------------------------------------

TEST(AllToAll, DataParallelGroupsOfTwoEachGetTheFullCombine) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  c.dp_size = 2;
  c.top_k = 3;
  c.spec.drop_fraction = 0.1;
  c.steps = 2;
  run_case(c);
}

TEST(AllToAll, NoPrivateRegionSendsEverythingAsOverflowOverShm) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  c.provider = "shm";
  c.private_tokens = 0;
  c.steps = 2;
  run_case(c);
}

TEST(AllToAll, SmallPrivateRegionSplitsRuns) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  c.private_tokens = 3;
  c.spec.routing = Routing::zipf;
  c.steps = 2;
  run_case(c);
}

TEST(AllToAll, TwentyBackToBackStepsWithSkewedRanksOverShm) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  c.max_tokens = 8;
  c.hidden = 64;
  c.steps = 20;
  c.max_skew_ms = 15;
  c.private_tokens = 4;
  c.provider = "shm";
  c.spec.vary_tokens = true;
  run_case(c);
}

TEST(AllToAll, TwoNicsCutLargeWritesIntoPiecesTheReceiverCounts) {
  // Overflow runs (~2 MB) and combine partials (2 MB) pass the engine's 1 MiB split threshold, so
  // they travel as one piece per NIC, each carrying the immediate.
  Case c;
  c.nets_per_rank = 2;
  c.num_experts = 2;
  c.top_k = 2;
  c.max_tokens = 128;
  c.hidden = 8192;
  c.private_tokens = 8;
  run_case(c);
}

TEST(AllToAll, SendAndRecvSplitWithWorkBetween) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  c.split = true;
  c.max_skew_ms = 10;
  c.steps = 3;
  run_case(c);
}

// ---- errors ------------------------------------------------------------------------------------

// One rank's dispatch outputs (no scales) and the arguments pointing at them and at `in`; `guard_bytes`
// of `fill` after expert_x show any write past the output.
struct DispatchCall {
  DispatchCall(const Layout& l, const reference::RankInput& in, size_t guard_bytes = 0, uint8_t fill = 0)
      : counts(l.experts_per_rank),
        expert_x_bytes(size_t(l.experts_per_rank) * l.max_rows_per_expert * l.payload_bytes),
        expert_x(expert_x_bytes + guard_bytes, fill) {
    args.out_expert_num_tokens = counts.data();
    args.out_expert_x = expert_x.data();
    args.dp_x = in.x.data();
    args.indices = in.indices.data();
    args.weights = in.weights.data();
    args.num_tokens = in.num_tokens;
    args.flags = FERRY_SEND_RECV;
  }
  DispatchCall(const DispatchCall&) = delete;
  DispatchCall& operator=(const DispatchCall&) = delete;

  std::vector<int32_t> counts;
  size_t expert_x_bytes;
  std::vector<uint8_t> expert_x;
  ferry_dispatch_args_t args{};
};

// Runs a 4-rank step where rank 2 passes `bad` inputs; every rank must fail within the deadline
// with the expected status and a message naming rank 2.
void expect_bad_input_fails_everywhere(const std::function<void(ferry_dispatch_args_t&, std::vector<int32_t>&)>& bad,
                                       Status bad_rank_status) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  c.timeout_ms = 40000;
  testing::LaunchOptions opts;
  opts.world_size = c.world_size;
  opts.timeout_ms = 90000;
  const auto results = testing::run_ranks(opts, [&](te::Bootstrap& b) {
    const ferry_a2a_config_t cfg = config_of(c, b.rank());
    const Layout l = make_layout(cfg);
    testing::ApiA2a a2a(cfg, b);
    auto inputs = reference::generate_all(cfg, c.spec);
    auto& in = inputs[l.rank];
    DispatchCall call(l, in);
    ferry_dispatch_args_t& d = call.args;
    std::vector<int32_t> bad_indices = in.indices;
    if (l.rank == 2) bad(d, bad_indices);
    const auto start = std::chrono::steady_clock::now();
    try {
      a2a.dispatch(d);
      ADD_FAILURE() << "rank " << l.rank << ": dispatch succeeded";
    } catch (const Error& e) {
      const std::string what = e.what();
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_LT(seconds, c.timeout_ms / 2000.0)
          << "rank " << l.rank << " waited for its deadline instead of failing fast: " << what;
      if (l.rank == 2) {
        EXPECT_EQ(e.status(), bad_rank_status) << what;
      } else {
        EXPECT_EQ(e.status(), Status::peer_failed) << what;
        EXPECT_NE(what.find("rank 2"), std::string::npos) << what;
      }
    }
    // The step is over for everyone: a later call says so instead of hanging.
    try {
      a2a.dispatch(d);
      ADD_FAILURE() << "dispatch after a failed step succeeded";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::internal) << e.what();
    }
  });
  testing::expect_all_ok(results);
}

TEST(AllToAllErrors, ExpertIdOutOfRangeFailsEveryRankFast) {
  expect_bad_input_fails_everywhere(
      [](ferry_dispatch_args_t& d, std::vector<int32_t>& idx) {
        idx[3] = 8;  // num_experts is 8
        d.indices = idx.data();
      },
      Status::invalid_argument);
}

TEST(AllToAllErrors, BoundMAboveNumTokensFailsEveryRankFast) {
  static const int32_t seventeen = 17;
  expect_bad_input_fails_everywhere([](ferry_dispatch_args_t& d, std::vector<int32_t>&) { d.bound_m = &seventeen; },
                                    Status::invalid_argument);
}

// Arguments the front door refuses (here num_tokens above max_tokens_per_rank on rank 2) change
// nothing: the same handle then runs the step, and every rank gets the reference's bytes.
TEST(AllToAllErrors, TooManyTokensIsRefusedBeforeAnythingMovesAndTheHandleStaysUsable) {
  Case c;
  c.world_size = 4;
  c.num_experts = 8;
  testing::expect_all_ok(testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
    const ferry_a2a_config_t cfg = config_of(c, b.rank());
    testing::ApiA2a a2a(cfg, b);
    if (b.rank() == 2) {
      const auto in = reference::generate_input(cfg, c.spec, 2);
      DispatchCall call(make_layout(cfg), in);
      call.args.num_tokens = c.max_tokens + 1;
      try {
        a2a.dispatch(call.args);
        ADD_FAILURE() << "num_tokens " << call.args.num_tokens << " accepted";
      } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::invalid_argument) << e.what();
        EXPECT_NE(std::string(e.what()).find("num_tokens 17 outside [0, max_tokens_per_rank=16]"), std::string::npos)
            << e.what();
      }
    }
    run_steps(a2a, cfg, c);
  }));
}

TEST(AllToAllErrors, AMissingRankIsNamedAtTheDeadline) {
  Case c;
  c.world_size = 3;
  c.num_experts = 3;
  c.top_k = 1;
  c.timeout_ms = 3000;
  testing::LaunchOptions opts;
  opts.world_size = c.world_size;
  opts.timeout_ms = 60000;
  const auto results = testing::run_ranks(opts, [&](te::Bootstrap& b) {
    const ferry_a2a_config_t cfg = config_of(c, b.rank());
    const Layout l = make_layout(cfg);
    testing::ApiA2a a2a(cfg, b);
    auto inputs = reference::generate_all(cfg, c.spec);
    auto& in = inputs[l.rank];
    DispatchCall call(l, in);
    ferry_dispatch_args_t& d = call.args;
    if (l.rank == 1) {
      b.barrier(30000);  // never dispatches; leaves after the others gave up
      return;
    }
    try {
      a2a.dispatch(d);
      ADD_FAILURE() << "dispatch succeeded without rank 1";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::timeout) << e.what();
      EXPECT_NE(std::string(e.what()).find("from rank 1"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("count headers"), std::string::npos) << e.what();
    }
    b.barrier(30000);
  });
  testing::expect_all_ok(results);
}

// Rank 1 agrees on the config, then runs the protocol by hand and corrupts what it sends rank 0;
// rank 0 (the C API on the host backend) must fail with peer_failed naming rank 1, and write nothing
// past the end of its output.
void expect_lie_detected(const std::function<void(const Layout&, const SendPlan&, uint8_t* send)>& corrupt,
                         const std::string& expected_text) {
  Case c;
  c.num_experts = 4;
  c.max_tokens = 8;
  c.top_k = 2;
  testing::LaunchOptions opts;
  opts.world_size = 2;
  const auto results = testing::run_ranks(opts, [&](te::Bootstrap& b) {
    const ferry_a2a_config_t cfg = config_of(c, b.rank());
    const Layout l = make_layout(cfg);
    const auto inputs = reference::generate_all(cfg, c.spec);
    const auto& in = inputs[l.rank];
    if (l.rank == 1) {
      // A liar that agrees on the config like any rank, then lies on the wire.
      const ConfigAgreement honest = describe_config(cfg, 1, c.provider, Status::ok, "");
      std::vector<uint8_t> everyone(2 * kAgreementBytes);
      b.allgather(&honest, sizeof honest, everyone.data(), 20000);
      te::EngineConfig ec;
      ec.provider = c.provider;
      te::TransferEngine engine(ec, b);
      testing::ProtocolHostRegions regions(l);
      Protocol protocol(l, engine, regions.buffers(), 20000);
      protocol.begin_dispatch();
      const SendPlan plan = make_send_plan(l, in.indices.data(), in.num_tokens, 0);
      host::pack_dispatch(l, plan, in.x.data(), nullptr, in.indices.data(), in.weights.data(), regions.send.data());
      corrupt(l, plan, regions.send.data());
      protocol.post_dispatch(plan.dest_count, plan.dest_offset);
      protocol.wait_dispatch();
      b.barrier(30000);
      return;
    }
    testing::ApiA2a a2a(cfg, b);
    constexpr size_t kGuard = 4096;
    DispatchCall call(l, in, kGuard, 0x5a);
    ferry_dispatch_args_t& d = call.args;
    try {
      a2a.dispatch(d);
      ADD_FAILURE() << "rank 0 accepted corrupted data";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::peer_failed) << e.what();
      EXPECT_NE(std::string(e.what()).find("rank 1"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(expected_text), std::string::npos) << e.what();
    }
    for (size_t i = call.expert_x_bytes; i < call.expert_x.size(); ++i) {
      ASSERT_EQ(call.expert_x[i], 0x5a) << "written past the output";
    }
    b.barrier(30000);
  });
  testing::expect_all_ok(results);
}

TEST(AllToAllErrors, CountHeaderBeyondMaxTokensIsRejected) {
  expect_lie_detected(
      [](const Layout& l, const SendPlan& plan, uint8_t* send) {
        header_counts(send + l.send_section_offset(0, plan.dest_offset[0]))[0] = l.max_tokens + 1;
      },
      "claims 9 records");
}

TEST(AllToAllErrors, RecordWithOutOfRangeLocalExpertIsRejected) {
  expect_lie_detected(
      [](const Layout& l, const SendPlan& plan, uint8_t* send) {
        ASSERT_GT(plan.dest_count[0], 0);
        auto* h = reinterpret_cast<RecordHeader*>(send + l.send_record_offset(0, plan.dest_offset[0], 0));
        h->local_expert[0] = int16_t(l.experts_per_rank);
      },
      "local expert out of range");
}

TEST(AllToAllErrors, MoreRowsThanAnnouncedAreRejected) {
  expect_lie_detected(
      [](const Layout& l, const SendPlan& plan, uint8_t* send) {
        ASSERT_GT(plan.dest_count[0], 1);
        // Every record claims local expert 0 only: expert 0 exceeds its announced rows.
        for (int i = 0; i < plan.dest_count[0]; ++i) {
          auto* h = reinterpret_cast<RecordHeader*>(send + l.send_record_offset(0, plan.dest_offset[0], i));
          h->num_routes = 1;
          h->local_expert[0] = 0;
        }
      },
      "announced");
}

TEST(AllToAllErrors, DpGroupMembersWithDifferentTokensAreRejected) {
  Case c;
  c.world_size = 2;
  c.dp_size = 2;
  testing::LaunchOptions opts;
  opts.world_size = 2;
  const auto results = testing::run_ranks(opts, [&](te::Bootstrap& b) {
    const ferry_a2a_config_t cfg = config_of(c, b.rank());
    const Layout l = make_layout(cfg);
    testing::ApiA2a a2a(cfg, b);
    const auto in = reference::generate_input(cfg, c.spec, l.rank);
    DispatchCall call(l, in);
    ferry_dispatch_args_t& d = call.args;
    if (l.rank == 1) d.num_tokens = in.num_tokens / 2;  // rank 1 was given fewer tokens
    try {
      a2a.dispatch(d);
      ADD_FAILURE() << "members with different tokens accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::invalid_argument) << e.what();
      EXPECT_NE(std::string(e.what()).find("dp group"), std::string::npos) << e.what();
    }
  });
  testing::expect_all_ok(results);
}

TEST(AllToAllErrors, StepsOutOfOrderAreRejected) {
  Case c;
  testing::LaunchOptions opts;
  opts.world_size = 2;
  const auto results = testing::run_ranks(opts, [&](te::Bootstrap& b) {
    const ferry_a2a_config_t cfg = config_of(c, b.rank());
    testing::ApiA2a a2a(cfg, b);
    ferry_combine_args_t cb{};
    cb.flags = FERRY_SEND_RECV;
    try {
      a2a.combine(cb);
      ADD_FAILURE() << "combine before any dispatch succeeded";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("must alternate"), std::string::npos) << e.what();
    }
    // Refused, not failed: the handle runs its first step as if nothing had happened.
    run_steps(a2a, cfg, c);
  });
  testing::expect_all_ok(results);
}

// Combine writes exactly the rows its dispatch sent: a num_tokens above it (even above
// max_tokens_per_rank, which dispatch refuses) or below it is refused on every rank before the
// wait, the handle stays usable, and the right num_tokens then returns the reference's sums
// without touching the rows after them.
TEST(AllToAllErrors, CombineNumTokensOtherThanItsDispatchsIsRefusedOnEveryRank) {
  Case c;
  c.world_size = 3;
  c.num_experts = 6;
  c.out_dtype = FERRY_F32;
  testing::expect_all_ok(testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
    const ferry_a2a_config_t cfg = config_of(c, b.rank());
    const Layout l = make_layout(cfg);
    testing::ApiA2a a2a(cfg, b);
    const auto inputs = reference::generate_all(cfg, c.spec);
    const reference::RankInput& in = inputs[l.rank];
    DispatchCall call(l, in);
    a2a.dispatch(call.args);
    std::vector<uint8_t> expert_y(size_t(l.experts_per_rank) * l.max_rows_per_expert * l.out_row_bytes());
    reference::apply_experts(l, call.counts.data(), call.expert_x.data(), nullptr, expert_y.data());
    const size_t spare_rows = 8;
    std::vector<uint8_t> out((size_t(l.max_tokens) + spare_rows) * l.out_row_bytes(), 0x77);
    ferry_combine_args_t cb{};
    cb.out_tokens = out.data();
    cb.indices = in.indices.data();
    cb.weights = in.weights.data();
    cb.expert_y = expert_y.data();
    cb.flags = FERRY_SEND_RECV;
    for (const int bad : {in.num_tokens + 1, l.max_tokens + int(spare_rows), in.num_tokens - 1}) {
      cb.num_tokens = bad;
      try {
        a2a.combine(cb);
        ADD_FAILURE() << "rank " << l.rank << ": combine of " << bad << " tokens after a dispatch of "
                      << in.num_tokens << " accepted";
      } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::invalid_argument) << e.what();
        EXPECT_NE(std::string(e.what()).find("num_tokens " + std::to_string(bad) + " is not the " +
                                             std::to_string(in.num_tokens) + " of this step's dispatch"),
                  std::string::npos)
            << e.what();
      }
    }
    cb.num_tokens = in.num_tokens;
    a2a.combine(cb);
    EXPECT_EQ(reference::compare_combine(cfg, reference::combine_standard(cfg, in),
                                         reference::combine_magnitude_standard(cfg, in), out.data(), in.num_tokens),
              "");
    for (size_t i = size_t(in.num_tokens) * l.out_row_bytes(); i < out.size(); ++i)
      ASSERT_EQ(out[i], 0x77) << "rank " << l.rank << ": byte " << i << " after the dispatch's rows written";
  }));
}

// A quantize call the all-to-all cannot honour (here scales given although Ferry computes them) is
// refused before anything moves; the same handle then runs the steps and every rank gets the
// reference's bytes.
TEST(AllToAllErrors, ARefusedQuantizeCallChangesNothingAndTheStepsThenRun) {
  Case c = quantize_case();
  c.world_size = 3;
  c.num_experts = 6;
  testing::expect_all_ok(testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
    const ferry_a2a_config_t cfg = config_of(c, b.rank());
    testing::ApiA2a a2a(cfg, b);
    if (b.rank() == 1) {
      const auto in = reference::generate_input(cfg, c.spec, 1);
      DispatchCall call(make_layout(cfg), in);
      const std::vector<float> scales(size_t(in.num_tokens) * 8, 1.0f);
      call.args.quantize = FERRY_QUANTIZE_FP8_BLOCK;
      call.args.dp_x_scale = scales.data();
      try {
        a2a.dispatch(call.args);
        ADD_FAILURE() << "dp_x_scale with quantize accepted";
      } catch (const Error& e) {
        EXPECT_EQ(e.status(), Status::invalid_argument) << e.what();
        EXPECT_NE(std::string(e.what()).find("dp_x_scale must be NULL with quantize"), std::string::npos) << e.what();
      }
    }
    run_steps(a2a, cfg, c);
  }));
}

// ---- ranks agree on the config ----------------------------------------------------------------

// One way for the last rank's config to differ from the others', and the fields every rank's
// error must name.
struct Disagreement {
  const char* name;
  std::vector<std::string> fields;
  std::function<void(ferry_a2a_config_t&)> change;
};

const Disagreement kDisagreements[] = {
    {"WorldSize", {"world_size"}, [](ferry_a2a_config_t& c) { c.world_size *= 2; }},
    {"NumExperts", {"num_experts"}, [](ferry_a2a_config_t& c) { c.num_experts *= 2; }},
    {"ExpertsPerToken", {"experts_per_token"}, [](ferry_a2a_config_t& c) { c.experts_per_token = 3; }},
    {"MaxTokens", {"max_tokens_per_rank"}, [](ferry_a2a_config_t& c) { c.max_tokens_per_rank = 64; }},
    {"HiddenDim", {"hidden_dim"}, [](ferry_a2a_config_t& c) { c.hidden_dim = 64; }},
    {"InDtype", {"in_dtype"}, [](ferry_a2a_config_t& c) { c.in_dtype = FERRY_F16; }},
    {"ScaleBlock", {"scale_block"}, [](ferry_a2a_config_t& c) { c.scale_block = 32; }},
    {"OutDtype", {"out_dtype"}, [](ferry_a2a_config_t& c) { c.out_dtype = FERRY_F32; }},
    {"PrivateTokens", {"private_tokens"}, [](ferry_a2a_config_t& c) { c.private_tokens = 4; }},
    {"DpSize", {"dp_size"}, [](ferry_a2a_config_t& c) { c.dp_size = 2; }},
    {"Device", {"device"}, [](ferry_a2a_config_t& c) { c.device = FERRY_DEVICE_CUDA; }},
    {"NetsPerRank", {"nets_per_rank"}, [](ferry_a2a_config_t& c) { c.nets_per_rank = 2; }},
    {"Provider", {"provider"}, [](ferry_a2a_config_t& c) { c.provider = "shm"; }},
    {"CombineWeights", {"combine_weights"}, [](ferry_a2a_config_t& c) { c.combine_weights = FERRY_WEIGHTS_AT_COMBINE; }},
    // Pairs that used to run to the end with every status FERRY_OK and wrong combine output (with
    // MaxTokens and OutDtype above).
    {"Bf16AgainstF16InAndOut", {"in_dtype", "out_dtype"},
     [](ferry_a2a_config_t& c) { c.in_dtype = c.out_dtype = FERRY_F16; }},
    {"Hidden128Bf16Against64F32", {"hidden_dim", "in_dtype"},
     [](ferry_a2a_config_t& c) {
       c.hidden_dim = 64;
       c.in_dtype = FERRY_F32;
     }},
};

void PrintTo(const Disagreement& d, std::ostream* os) { *os << d.name; }

class ConfigAgreementTest : public ::testing::TestWithParam<std::tuple<Disagreement, int>> {};

// Creates the all-to-all expecting it to fail at once, long before any deadline; returns the error.
Error create_error(const ferry_a2a_config_t& cfg, te::Bootstrap& b) {
  const auto start = std::chrono::steady_clock::now();
  try {
    testing::ApiA2a a2a(cfg, b);
  } catch (const Error& e) {
    EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(cfg.timeout_ms / 2))
        << "rank " << b.rank() << " waited for a deadline";
    return e;
  }
  ADD_FAILURE() << "rank " << b.rank() << ": create succeeded";
  return Error(Status::ok, "");
}

TEST_P(ConfigAgreementTest, EveryRankFailsCreateNamingTheFieldAndTheValues) {
  const Disagreement& d = std::get<0>(GetParam());
  const int world = std::get<1>(GetParam());
  Case c;
  c.world_size = world;
  c.num_experts = 4 * world;
  c.max_tokens = 16;
  testing::expect_all_ok(testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
    ferry_a2a_config_t cfg = config_of(c, b.rank());
    const int odd = world - 1;
    if (b.rank() == odd) d.change(cfg);
    const Error e = create_error(cfg, b);
    const std::string what = e.what();
    EXPECT_EQ(e.status(), Status::invalid_argument) << what;
    for (const std::string& field : d.fields) EXPECT_NE(what.find(field + ": rank 0 has "), std::string::npos) << what;
    EXPECT_NE(what.find("rank " + std::to_string(odd) + " has "), std::string::npos) << what;
    EXPECT_NE(what.find("1 of " + std::to_string(world) + " ranks differ from rank 0"), std::string::npos) << what;
  }));
}

INSTANTIATE_TEST_SUITE_P(
    Fields, ConfigAgreementTest, ::testing::Combine(::testing::ValuesIn(kDisagreements), ::testing::Values(2, 4)),
    [](const ::testing::TestParamInfo<ConfigAgreementTest::ParamType>& info) {
      return std::string(std::get<0>(info.param).name) + "On" + std::to_string(std::get<1>(info.param)) + "Ranks";
    });

// A config that fails its own rank's checks (in a field no other rank compares) fails create on
// every rank at once, naming that rank and why: the others do not wait for it until their deadline.
TEST(ConfigAgreement, AnInvalidConfigOnOneRankFailsEveryRankNamingIt) {
  Case c;
  c.world_size = 3;
  c.num_experts = 6;
  testing::expect_all_ok(testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
    ferry_a2a_config_t cfg = config_of(c, b.rank());
    if (b.rank() == 1) cfg.expert_alignment = 0;
    const Error e = create_error(cfg, b);
    const std::string what = e.what();
    EXPECT_EQ(e.status(), Status::invalid_argument) << what;
    EXPECT_NE(what.find("expert_alignment 0 outside [1, 2^30]"), std::string::npos) << what;
    if (b.rank() != 1) {
      EXPECT_NE(what.find("the config of rank 1 fails its own checks"), std::string::npos) << what;
    }
  }));
}

// FERRY_HOST_THREADS is read at create like the config, so a bad value fails every rank there.
TEST(HostThreads, AnUnusableValueFailsCreateOnEveryRankNamingIt) {
  Case c;
  testing::LaunchOptions options = testing::launch_options(c);
  options.env["FERRY_HOST_THREADS"] = "0";
  testing::expect_all_ok(testing::run_ranks(options, [&](te::Bootstrap& b) {
    const Error e = create_error(config_of(c, b.rank()), b);
    const std::string what = e.what();
    EXPECT_EQ(e.status(), Status::invalid_argument) << what;
    EXPECT_NE(what.find("FERRY_HOST_THREADS='0'"), std::string::npos) << what;
  }));
}

// What only shapes a rank's own side may differ: its output padding and its deadlines.
TEST(ConfigAgreement, ExpertAlignmentAndTimeoutAreEachRanksOwn) {
  Case c;
  c.world_size = 3;
  c.num_experts = 6;
  c.steps = 2;
  testing::expect_all_ok(testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& b) {
    run_rank(b, c, [](int rank, ferry_a2a_config_t& cfg) {
      cfg.expert_alignment = 1 + 3 * rank;
      cfg.timeout_ms = 20000 + 5000 * rank;
    });
  }));
}

}  // namespace
}  // namespace ferry::ep
