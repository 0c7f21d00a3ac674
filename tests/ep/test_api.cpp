// The public C and C++ API: status codes and last-error text, buffer sizing without a job, and a
// full dispatch/combine through ferry.hpp on a caller-provided process group (callback bootstrap).
#include <gtest/gtest.h>

#include <cstring>
#include <iostream>

#include "csrc/api.h"
#include "csrc/backend.h"
#include "csrc/reference.h"
#include "ferry/ferry.h"
#include "ferry/ferry.hpp"
#include "tests/common/multiprocess.h"
#include "tests/common/api_a2a.h"

namespace {

ferry_a2a_config_t decode_ep64() {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.world_size = 64;
  c.num_experts = 256;
  c.experts_per_token = 8;
  c.max_tokens_per_rank = 128;
  c.hidden_dim = 7168;
  c.in_dtype = FERRY_FP8_E4M3;
  c.scale_block = 128;
  c.out_dtype = FERRY_BF16;
  return c;
}

TEST(CApi, StatusStringsAndEmptyLastErrorAfterSuccess) {
  EXPECT_STREQ(ferry_status_string(FERRY_ERR_TIMEOUT), "timeout");
  ferry_buffer_sizes_t s;
  const ferry_a2a_config_t c = decode_ep64();
  ASSERT_EQ(ferry_a2a_buffer_sizes(&c, &s), FERRY_OK);
  EXPECT_STREQ(ferry_last_error(), "");
}

TEST(CApi, InvalidConfigGivesTheStatusAndAMessageNamingTheField) {
  ferry_a2a_config_t c = decode_ep64();
  c.num_experts = 250;
  ferry_buffer_sizes_t s;
  EXPECT_EQ(ferry_a2a_buffer_sizes(&c, &s), FERRY_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ferry_last_error()).find("num_experts 250"), std::string::npos) << ferry_last_error();
  c = decode_ep64();
  c.experts_per_token = 9;
  EXPECT_EQ(ferry_a2a_buffer_sizes(&c, &s), FERRY_ERR_UNSUPPORTED);
  EXPECT_EQ(ferry_a2a_buffer_sizes(nullptr, &s), FERRY_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(ferry_a2a_dispatch(nullptr, nullptr, nullptr), FERRY_ERR_INVALID_ARGUMENT);
}

TEST(CApi, BufferSizesOfEp64DecodeStayFarBelowPerExpertDesigns) {
  const ferry_buffer_sizes_t s = ferry::AllToAll::buffer_sizes(decode_ep64());
  EXPECT_EQ(s.record_bytes, 64u + 7168 + 56 * 4);
  EXPECT_EQ(s.num_local_experts, 4);
  EXPECT_EQ(s.max_rows_per_expert, 64 * 128);
  // One record per (token, destination rank): send staging holds 128 tokens x 8 destinations.
  EXPECT_EQ(s.send_bytes, 64u * ferry::ep::align_up(4 * 68) + 128u * 8 * s.record_bytes);
  EXPECT_EQ(s.recv_bytes, 64u * (ferry::ep::align_up(4 * 68) + 128u * s.record_bytes));
  // pplx-garden needs about 670 MiB for its receive buffer at this shape.
  EXPECT_LT(s.total_registered_bytes, 256ull << 20);
  std::cout << "EP64 decode: record " << s.record_bytes << " B, send " << s.send_bytes << " B, recv " << s.recv_bytes
            << " B, combine send " << s.combine_send_bytes << " B, combine recv " << s.combine_recv_bytes
            << " B, total registered " << s.total_registered_bytes << " B\n";
}

TEST(CApi, CreateRefusesANullBootstrapAndLeavesTheHandleNull) {
  ferry_a2a_config_t c = decode_ep64();
  c.device = FERRY_DEVICE_CUDA;
  ferry_a2a_t a2a = nullptr;
  EXPECT_EQ(ferry_a2a_create(&c, nullptr, &a2a), FERRY_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(a2a, nullptr);
}

int allgather_through(void* context, const void* in, size_t bytes, void* out) {
  try {
    static_cast<ferry::te::Bootstrap*>(context)->allgather(in, bytes, out, 30000);
    return 0;
  } catch (...) {
    return 1;
  }
}

// Sizing refuses what a later step could not do; each case names the field and the reason.
std::string sizing_error(const ferry_a2a_config_t& c, ferry_status_t want) {
  ferry_buffer_sizes_t s;
  EXPECT_EQ(ferry_a2a_buffer_sizes(&c, &s), want) << ferry_last_error();
  return ferry_last_error();
}

ferry_a2a_config_t one_rank(int num_experts, int hidden_dim) {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.num_experts = num_experts;
  c.hidden_dim = hidden_dim;
  return c;
}

TEST(CApiLimits, ExpertsPerRankAbove32767AreRefusedBecauseRecordsCarryThemIn16Bits) {
  EXPECT_EQ(sizing_error(one_rank(FERRY_MAX_EXPERTS_PER_RANK, 64), FERRY_OK), "");
  const std::string what = sizing_error(one_rank(FERRY_MAX_EXPERTS_PER_RANK + 1, 64), FERRY_ERR_UNSUPPORTED);
  EXPECT_NE(what.find("32768 experts per rank, above 32767"), std::string::npos) << what;
  EXPECT_NE(what.find("16 bits"), std::string::npos) << what;
  ferry_a2a_config_t two = one_rank(2 * 32768, 64);
  two.world_size = 2;
  EXPECT_NE(sizing_error(two, FERRY_ERR_UNSUPPORTED).find("num_experts 65536 over world_size 2"), std::string::npos);
}

// What a C caller may store in an enum field, written as C would (a C++ cast to the enum type of
// a value outside it is itself undefined).
template <class Enum>
void store_int(Enum& field, int value) {
  static_assert(sizeof(Enum) == sizeof(int));
  std::memcpy(&field, &value, sizeof value);
}

TEST(CApiLimits, EnumFieldsHoldingNoValueOfTheirEnumAreRefused) {
  ferry_a2a_config_t c = one_rank(2, 64);
  store_int(c.in_dtype, 0x7f7f7f7f);
  EXPECT_NE(sizing_error(c, FERRY_ERR_UNSUPPORTED).find("in_dtype 2139062143"), std::string::npos);
  c = one_rank(2, 64);
  store_int(c.out_dtype, -1);
  EXPECT_NE(sizing_error(c, FERRY_ERR_UNSUPPORTED).find("out_dtype unknown (-1)"), std::string::npos);
  c = one_rank(2, 64);
  store_int(c.device, 9);
  EXPECT_NE(sizing_error(c, FERRY_ERR_INVALID_ARGUMENT).find("device 9"), std::string::npos);
}

TEST(CApiLimits, RowsOfOtherThanSixteenBytesAndScaleBlocksNotDividingHiddenAreRefused) {
  ferry_a2a_config_t c = one_rank(2, 7);
  c.in_dtype = FERRY_F32;  // 28-byte rows
  EXPECT_NE(sizing_error(c, FERRY_ERR_UNSUPPORTED).find("hidden_dim 7 of f32 is not a positive multiple of 16 bytes"),
            std::string::npos);
  c = one_rank(2, 100);  // 200-byte bf16 rows
  EXPECT_NE(sizing_error(c, FERRY_ERR_UNSUPPORTED).find("hidden_dim 100 of bf16"), std::string::npos);
  c = one_rank(2, 128);
  c.scale_block = 48;
  EXPECT_NE(sizing_error(c, FERRY_ERR_UNSUPPORTED).find("not a multiple of scale_block 48"), std::string::npos);
}

TEST(CApiLimits, NicsAlignmentAndBufferSizesBeyondWhatTheLibraryCanHoldAreRefused) {
  ferry_a2a_config_t c = one_rank(2, 64);
  c.nets_per_rank = FERRY_MAX_NETS_PER_RANK + 1;
  EXPECT_NE(sizing_error(c, FERRY_ERR_INVALID_ARGUMENT).find("nets_per_rank 9 outside [1, 8]"), std::string::npos);
  // Row indices are ints: 2^30 rows padded to 2^30 + 1 would not be one.
  c = one_rank(1, 8);
  c.max_tokens_per_rank = 1 << 30;
  c.expert_alignment = (1 << 30) + 1;
  EXPECT_NE(sizing_error(c, FERRY_ERR_INVALID_ARGUMENT).find("expert_alignment 1073741825 outside [1, 2^30]"),
            std::string::npos);
  // 2^30 records of 2^34 bytes would wrap a 64-bit size.
  c = one_rank(1, 2147483644);
  c.in_dtype = FERRY_F32;
  c.scale_block = 1;
  c.max_tokens_per_rank = 1 << 30;
  EXPECT_NE(sizing_error(c, FERRY_ERR_UNSUPPORTED).find("more than 2^64 bytes of buffers"), std::string::npos);
}

// ---- handles -----------------------------------------------------------------------------------

// A bootstrap of one process that gathers by copying: handles without any peer or network.
int gather_alone(void*, const void* in, size_t bytes, void* out) {
  std::memcpy(out, in, bytes);
  return 0;
}

TEST(CApiHandles, ValuesThatAreNoLiveHandleOfTheirKindAreRefusedNamingWhatTheyAre) {
  ferry_bootstrap_t boot = nullptr;
  ASSERT_EQ(ferry_bootstrap_callback(0, 1, gather_alone, nullptr, &boot), FERRY_OK);
  int world = 0;
  EXPECT_EQ(ferry_bootstrap_world_size(boot, &world), FERRY_OK);
  EXPECT_EQ(world, 1);
  ferry_a2a_stats_t stats;
  EXPECT_EQ(ferry_a2a_stats(reinterpret_cast<ferry_a2a_t>(boot), &stats), FERRY_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ferry_last_error()).find("is a ferry_bootstrap_t, not a ferry_a2a_t"), std::string::npos)
      << ferry_last_error();
  long not_a_handle = 0;
  EXPECT_EQ(ferry_a2a_stats(reinterpret_cast<ferry_a2a_t>(&not_a_handle), &stats), FERRY_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ferry_last_error()).find("is not a ferry_a2a_t this library created"), std::string::npos)
      << ferry_last_error();
  EXPECT_EQ(ferry_bootstrap_rank(reinterpret_cast<ferry_bootstrap_t>(&not_a_handle), &world),
            FERRY_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(ferry_bootstrap_destroy(boot), FERRY_OK);
  EXPECT_EQ(ferry_bootstrap_destroy(boot), FERRY_ERR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(ferry_last_error()).find("was destroyed already"), std::string::npos) << ferry_last_error();
  EXPECT_EQ(ferry_bootstrap_rank(boot, &world), FERRY_ERR_INVALID_ARGUMENT);
  EXPECT_EQ(ferry_bootstrap_destroy(nullptr), FERRY_OK);  // like free(NULL)
}

// A small all-to-all of two ranks.
ferry_a2a_config_t two_ranks(int rank) {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.rank = rank;
  c.world_size = 2;
  c.num_experts = 4;
  c.experts_per_token = 2;
  c.max_tokens_per_rank = 8;
  c.hidden_dim = 64;
  return c;
}

// Destroying an all-to-all twice, or calling it after destroy, is an error (not a use after free,
// which ASan would report), and so is every call on the dead value.
TEST(CApiHandles, DestroyedAllToAllIsRefusedByEveryCallAndByASecondDestroy) {
  ferry::testing::LaunchOptions opts;
  opts.world_size = 2;
  ferry::testing::expect_all_ok(ferry::testing::run_ranks(opts, [](ferry::te::Bootstrap& group) {
    ferry::testing::ApiA2a a2a(two_ranks(group.rank()), group);
    const ferry_a2a_t dead = a2a.release();
    ASSERT_EQ(ferry_a2a_destroy(dead), FERRY_OK) << ferry_last_error();
    EXPECT_EQ(ferry_a2a_destroy(dead), FERRY_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(ferry_last_error()).find("ferry_a2a_destroy: ferry_a2a_t"), std::string::npos)
        << ferry_last_error();
    EXPECT_NE(std::string(ferry_last_error()).find("was destroyed already"), std::string::npos) << ferry_last_error();
    ferry_dispatch_args_t d{};
    d.flags = FERRY_SEND_RECV;
    ferry_combine_args_t cb{};
    cb.flags = FERRY_SEND_RECV;
    ferry_a2a_stats_t stats;
    ferry_buffer_sizes_t sizes;
    EXPECT_EQ(ferry_a2a_dispatch(dead, &d, nullptr), FERRY_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(ferry_a2a_combine(dead, &cb, nullptr), FERRY_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(ferry_a2a_stats(dead, &stats), FERRY_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(ferry_a2a_buffer_bytes(dead, &sizes), FERRY_ERR_INVALID_ARGUMENT);
  }));
}

// ferry_bootstrap_destroy releases the handle; an all-to-all created from it keeps the bootstrap
// until it is destroyed itself.
TEST(CApiHandles, AnAllToAllKeepsItsBootstrapAfterTheBootstrapHandleIsDestroyed) {
  ferry::testing::LaunchOptions opts;
  opts.world_size = 2;
  ferry::testing::expect_all_ok(ferry::testing::run_ranks(opts, [](ferry::te::Bootstrap& group) {
    const ferry_a2a_config_t c = two_ranks(group.rank());
    ferry_bootstrap_t boot = nullptr;
    ferry::testing::check_api(ferry_bootstrap_callback(c.rank, 2, allgather_through, &group, &boot));
    ferry_a2a_t a2a = nullptr;
    ferry::testing::check_api(ferry_a2a_create(&c, boot, &a2a));
    ferry::testing::check_api(ferry_bootstrap_destroy(boot));
    const auto inputs = ferry::ep::reference::generate_all(c, {});
    const auto& in = inputs[c.rank];
    const ferry::ep::Layout l = ferry::ep::make_layout(c);
    std::vector<int32_t> counts(l.experts_per_rank);
    std::vector<uint8_t> expert_x(size_t(l.experts_per_rank) * l.max_rows_per_expert * l.payload_bytes);
    ferry_dispatch_args_t d{};
    d.out_expert_num_tokens = counts.data();
    d.out_expert_x = expert_x.data();
    d.dp_x = in.x.data();
    d.indices = in.indices.data();
    d.weights = in.weights.data();
    d.num_tokens = in.num_tokens;
    d.flags = FERRY_SEND_RECV;
    ferry::testing::check_api(ferry_a2a_dispatch(a2a, &d, nullptr));
    EXPECT_EQ(ferry::ep::reference::compare_dispatch(c, ferry::ep::reference::dispatch(c, inputs, c.rank),
                                                     counts.data(), expert_x.data(), nullptr),
              "");
    ferry::testing::check_api(ferry_a2a_destroy(a2a));
  }));
}

// ---- the bootstrap's own allgather ---------------------------------------------------------------

TEST(CApiBootstrap, AllgatherGivesEveryRankEveryRanksBytesInRankOrder) {
  ferry::testing::LaunchOptions opts;
  opts.world_size = 3;
  ferry::testing::expect_all_ok(ferry::testing::run_ranks(opts, [](ferry::te::Bootstrap& group) {
    const ferry_bootstrap_t boot = ferry::api::borrow_bootstrap(group);
    int rank = -1, world = -1;
    ferry::testing::check_api(ferry_bootstrap_rank(boot, &rank));
    ferry::testing::check_api(ferry_bootstrap_world_size(boot, &world));
    EXPECT_EQ(rank, group.rank());
    EXPECT_EQ(world, 3);
    const uint64_t mine[2] = {uint64_t(rank) * 1000 + 1, uint64_t(rank) * 1000 + 2};
    uint64_t all[6] = {};
    ferry::testing::check_api(ferry_bootstrap_allgather(boot, mine, sizeof mine, all, 0));
    for (int r = 0; r < 3; ++r) {
      EXPECT_EQ(all[2 * r], uint64_t(r) * 1000 + 1);
      EXPECT_EQ(all[2 * r + 1], uint64_t(r) * 1000 + 2);
    }
    // Zero bytes is a barrier and needs no buffers; bytes without buffers are refused.
    ferry::testing::check_api(ferry_bootstrap_allgather(boot, nullptr, 0, nullptr, 10000));
    EXPECT_EQ(ferry_bootstrap_allgather(boot, nullptr, 8, all, 10000), FERRY_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(ferry_last_error()).find("in must not be NULL"), std::string::npos) << ferry_last_error();
    ferry::testing::check_api(ferry_bootstrap_destroy(boot));
  }));
}

TEST(CppApi, DispatchAndCombineOnTheCallersProcessGroup) {
  ferry::testing::LaunchOptions opts;
  opts.world_size = 3;
  const auto results = ferry::testing::run_ranks(opts, [](ferry::te::Bootstrap& group) {
    ferry_a2a_config_t c;
    ferry_a2a_config_init(&c);
    c.rank = group.rank();
    c.world_size = group.world_size();
    c.num_experts = 6;
    c.experts_per_token = 2;
    c.max_tokens_per_rank = 10;
    c.hidden_dim = 96;
    c.in_dtype = FERRY_F16;
    c.out_dtype = FERRY_F32;
    c.expert_alignment = 4;
    auto bootstrap = ferry::Bootstrap::callback(c.rank, c.world_size, allgather_through, &group);
    EXPECT_EQ(bootstrap.rank(), c.rank);
    const std::byte mine[] = {std::byte(10 + c.rank)};
    EXPECT_EQ(bootstrap.allgather(mine), (std::vector<std::byte>{std::byte(10), std::byte(11), std::byte(12)}));
    ferry::AllToAll a2a(c, bootstrap);
    const auto inputs = ferry::ep::reference::generate_all(c, {});
    const auto& in = inputs[c.rank];
    std::vector<int32_t> counts(a2a.sizes().num_local_experts);
    std::vector<std::byte> expert_x(a2a.expert_rows() * 96 * 2);
    a2a.dispatch(counts, expert_x, {}, std::as_bytes(std::span(in.x)), {}, in.indices, in.weights, in.num_tokens);
    const auto want = ferry::ep::reference::dispatch(c, inputs, c.rank);
    EXPECT_EQ(ferry::ep::reference::compare_dispatch(c, want, counts.data(), expert_x.data(), nullptr), "");
    const ferry_a2a_stats_t stats = a2a.stats();
    EXPECT_GT(stats.dispatch_records_sent, 0u);
    EXPECT_EQ(stats.overflow_records_sent, 0u);  // automatic private region holds whole runs

    const ferry::ep::Layout l = ferry::ep::make_layout(c);
    std::vector<std::byte> expert_y(a2a.expert_rows() * 96 * 4);
    ferry::ep::reference::apply_experts(l, counts.data(), expert_x.data(), nullptr, expert_y.data());
    std::vector<std::byte> out(size_t(in.num_tokens) * 96 * 4);
    a2a.combine(out, in.indices, in.weights, expert_y, in.num_tokens);
    const auto expected = ferry::ep::reference::combine_standard(c, in);
    EXPECT_EQ(ferry::ep::reference::compare_combine(c, expected, {}, out.data(), in.num_tokens), "");
    EXPECT_GT(a2a.stats().combine_bytes_sent, 0u);

    // A span too small for the call is refused before anything moves.
    try {
      a2a.dispatch(counts, std::span(expert_x).first(16), {}, std::as_bytes(std::span(in.x)), {}, in.indices,
                   in.weights, in.num_tokens);
      ADD_FAILURE() << "short out_expert_x accepted";
    } catch (const ferry::Exception& e) {
      EXPECT_EQ(e.status(), FERRY_ERR_INVALID_ARGUMENT);
      EXPECT_NE(std::string(e.what()).find("out_expert_x"), std::string::npos) << e.what();
    }
  });
  ferry::testing::expect_all_ok(results);
}

}  // namespace
