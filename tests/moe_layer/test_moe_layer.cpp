// One MoE layer between real processes on the host backend (tcp, shm): every rank all-reduces its
// attention-TP partial, runs the layer in the plain and the two-micro-batch schedule, and checks
// every token of its output against the dense reference (model.h, reference.h), the rows each of its
// experts received against the reference router, and the all-reduced hidden states exactly.
// Schedules that drop a RECV must fail on every rank with an error that names what went wrong.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "bench/moe_layer/layer.h"
#include "bench/moe_layer/reference.h"
#include "bench/moe_layer/tp_all_reduce.h"
#include "csrc/plan.h"
#include "tests/common/a2a_case.h"
#include "tests/common/multiprocess.h"
#include "tools/common/bootstrap.h"
#include "transfer_engine/error.h"

namespace ferry::moe {
namespace {

using ::testing::HasSubstr;
using Case = testing::A2aCase;

// The layer's shape from the shared all-to-all case: max_tokens is a group's tokens per step,
// dp_size the attention-TP size.
LayerShape shape_of(const Case& c, int intermediate = 32) {
  LayerShape s;
  s.world_size = c.world_size;
  s.tp_size = c.dp_size;
  s.num_experts = c.num_experts;
  s.top_k = c.top_k;
  s.hidden = c.hidden;
  s.intermediate = intermediate;
  s.tokens = c.max_tokens;
  s.out_dtype = c.out_dtype;
  s.seed = c.spec.seed;
  return s;
}

// A rank's layer and the hidden states it runs on (after the TP all-reduce).
struct RankLayer {
  RankLayer(te::Bootstrap& boot, const Case& c)
      : shape(shape_of(c)), cboot(boot), layer(options(boot, c), cboot.get()) {
    x = attention_partial(shape, shape.group_of(boot.rank()), shape.member_of(boot.rank()));
    make_bootstrap_all_reduce(cboot.get(), shape.tp_size, c.timeout_ms)->all_reduce_bf16(x.data(), x.size());
    layer.set_tokens(x.data());
  }
  LayerOptions options(te::Bootstrap& boot, const Case& c) const {
    LayerOptions o;
    o.shape = shape;
    o.rank = boot.rank();
    o.provider = c.provider;
    o.timeout_ms = c.timeout_ms;
    o.micro_batches = 2;
    o.gemm_threads = 1;
    return o;
  }
  std::vector<uint8_t> output() const {
    std::vector<uint8_t> out(size_t(shape.tokens) * shape.hidden * ep::elem_bytes_of(shape.out_dtype));
    layer.download_output(out.data());
    return out;
  }

  LayerShape shape;
  tools::CBootstrap cboot;
  MoeLayer layer;
  std::vector<uint16_t> x;
};

void expect_layer_matches_reference(const Case& c) {
  auto results = testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& boot) {
    RankLayer r(boot, c);
    const int rank = boot.rank();
    const ReferenceOutput want = reference_layer(r.shape, r.shape.group_of(rank));
    ASSERT_EQ(r.x, want.x) << "the TP all-reduce must give the sum of the partials exactly";
    for (ScheduleKind kind : {ScheduleKind::plain, ScheduleKind::tbo}) {
      SCOPED_TRACE(schedule_name(kind));
      const Schedule schedule = make_schedule(kind);
      r.layer.run(schedule);
      const int n = num_micro_batches(schedule);
      for (int b = 0; b < n; ++b)
        EXPECT_EQ(r.layer.expert_counts(b), reference_expert_counts(r.shape, rank, n, b)) << "micro-batch " << b;
      std::vector<uint8_t> out = r.output();
      EXPECT_EQ(compare_output(r.shape, want, rank, 0, out.data(), r.shape.tokens), "");

      // The check can fail: two tokens' outputs swapped are caught.
      const size_t row = out.size() / size_t(r.shape.tokens);
      std::swap_ranges(out.begin(), out.begin() + row, out.begin() + row);
      EXPECT_NE(compare_output(r.shape, want, rank, 0, out.data(), r.shape.tokens), "");
    }
  });
  testing::expect_all_ok(results);
}

Case small_case(int world, const std::string& provider) {
  Case c;
  c.world_size = world;
  c.num_experts = 2 * world;
  c.top_k = 2;
  c.max_tokens = 12;
  c.hidden = 64;
  c.provider = provider;
  c.timeout_ms = 20000;
  c.launch_timeout_ms = 60000;
  return c;
}

TEST(MoeLayer, FourRanksOverTcpMatchDenseReferenceInBothSchedules) {
  expect_layer_matches_reference(small_case(4, "tcp"));
}

TEST(MoeLayer, FourRanksOverShmWithF32OutputMatchDenseReferenceInBothSchedules) {
  Case c = small_case(4, "shm");
  c.out_dtype = FERRY_F32;
  expect_layer_matches_reference(c);
}

TEST(MoeLayer, EightRanksOverTcpWithAttentionTpOfTwoMatchDenseReferenceInBothSchedules) {
  Case c = small_case(8, "tcp");
  c.dp_size = 2;
  c.top_k = 3;
  expect_layer_matches_reference(c);
}

TEST(MoeLayer, EightRanksOverShmMatchDenseReferenceInBothSchedules) {
  expect_layer_matches_reference(small_case(8, "shm"));
}

// ---- schedules that drop a RECV ------------------------------------------------------------------

Schedule without(Schedule s, OpKind kind, int batch) {
  const auto it = std::find_if(s.begin(), s.end(), [&](const Op& op) { return op.kind == kind && op.batch == batch; });
  EXPECT_NE(it, s.end());
  s.erase(it);
  return s;
}

// Runs the two-micro-batch schedule with `dropping` ranks running `broken` instead; returns each
// rank's result (the error text is in its output).
std::vector<testing::RankResult> run_tbo_with(const Case& c, const std::vector<int>& dropping, const Schedule& broken) {
  return testing::run_ranks(testing::launch_options(c), [&](te::Bootstrap& boot) {
    RankLayer r(boot, c);
    const bool drops = std::find(dropping.begin(), dropping.end(), boot.rank()) != dropping.end();
    r.layer.run(drops ? broken : make_schedule(ScheduleKind::tbo));
  });
}

TEST(MoeLayerErrors, DroppedDispatchRecvFailsEveryRankAtItsNextCall) {
  const Case c = small_case(4, "tcp");
  const Schedule broken = without(make_schedule(ScheduleKind::tbo), OpKind::dispatch_recv, 1);
  const auto results = run_tbo_with(c, {0, 1, 2, 3}, broken);
  for (const auto& r : results) {
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_FALSE(r.timed_out);
    EXPECT_THAT(r.output, HasSubstr("combine SEND of micro-batch 1"));
    EXPECT_THAT(r.output, HasSubstr("out of order"));
  }
}

TEST(MoeLayerErrors, DroppedDispatchRecvOnOneRankIsNamedByTheOthersAtTheDeadline) {
  Case c = small_case(4, "shm");
  c.timeout_ms = 3000;
  const Schedule broken = without(make_schedule(ScheduleKind::tbo), OpKind::dispatch_recv, 1);
  const auto results = run_tbo_with(c, {1}, broken);
  EXPECT_THAT(results[1].output, HasSubstr("out of order"));
  for (int rank : {0, 2, 3}) {
    const auto& r = results[size_t(rank)];
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_FALSE(r.timed_out) << "rank " << rank << " hung instead of failing at its deadline";
    EXPECT_THAT(r.output, HasSubstr("combine RECV of micro-batch 1"));
    EXPECT_THAT(r.output, HasSubstr("from rank 1"));
  }
}

TEST(MoeLayerErrors, DroppedFinalCombineRecvLeavesTheStepUnfinishedAndSaysSo) {
  const Case c = small_case(4, "tcp");
  const Schedule broken = without(make_schedule(ScheduleKind::tbo), OpKind::combine_recv, 1);
  const auto results = run_tbo_with(c, {0, 1, 2, 3}, broken);
  for (const auto& r : results) {
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_THAT(r.output, HasSubstr("left micro-batch 1 after 3 of its 4 all-to-all halves"));
  }
}

}  // namespace
}  // namespace ferry::moe
