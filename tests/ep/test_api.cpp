// The public C and C++ API: status codes and last-error text, buffer sizing without a job, and a
// full dispatch/combine through ferry.hpp on a caller-provided process group (callback bootstrap).
#include <gtest/gtest.h>

#include <cstring>
#include <iostream>

#include "csrc/backend.h"
#include "csrc/reference.h"
#include "ferry/ferry.h"
#include "ferry/ferry.hpp"
#include "tests/common/multiprocess.h"

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
