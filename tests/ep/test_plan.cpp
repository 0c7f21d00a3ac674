// The plan on its own: config validation, routing checks, counts, prefix sums, slots, receive rows,
// wire sizes, dtype rounding, and the reference's generator.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <vector>
#include <cmath>
#include <cstring>
#include <numeric>

#include "csrc/agreement.h"
#include "csrc/argcheck.h"
#include "csrc/backend.h"
#include "csrc/dtype.h"
#include "csrc/host/work_pool.h"
#include "csrc/plan.h"
#include "csrc/reference.h"
#include "transfer_engine/error.h"

namespace ferry::ep {
namespace {

ferry_a2a_config_t config(int world_size, int num_experts, int top_k, int max_tokens, int hidden) {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.world_size = world_size;
  c.num_experts = num_experts;
  c.experts_per_token = top_k;
  c.max_tokens_per_rank = max_tokens;
  c.hidden_dim = hidden;
  return c;
}

Status status_of(const ferry_a2a_config_t& c) {
  try {
    make_layout(c);
    return Status::ok;
  } catch (const Error& e) {
    return e.status();
  }
}

std::string error_of(const ferry_a2a_config_t& c) {
  try {
    make_layout(c);
    return "";
  } catch (const Error& e) {
    return e.what();
  }
}

TEST(Config, DefaultsDescribeABf16HostAllToAll) {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  EXPECT_EQ(c.in_dtype, FERRY_BF16);
  EXPECT_EQ(c.out_dtype, FERRY_BF16);
  EXPECT_EQ(c.expert_alignment, 1);
  EXPECT_EQ(c.dp_size, 1);
  EXPECT_EQ(c.nets_per_rank, 1);
  EXPECT_EQ(c.device, FERRY_DEVICE_HOST);
  EXPECT_EQ(c.private_tokens, -1);
  EXPECT_EQ(c.timeout_ms, FERRY_DEFAULT_TIMEOUT_MS);
  EXPECT_EQ(c.combine_weights, FERRY_WEIGHTS_AT_DISPATCH);
}

TEST(Config, RejectsEachInvalidFieldNamingIt) {
  auto c = config(4, 16, 2, 8, 64);
  EXPECT_EQ(status_of(c), Status::ok);
  { auto b = c; b.num_experts = 18; EXPECT_NE(error_of(b).find("num_experts 18"), std::string::npos); }
  { auto b = c; b.rank = 4; EXPECT_NE(error_of(b).find("rank 4"), std::string::npos); }
  { auto b = c; b.experts_per_token = 9; EXPECT_EQ(status_of(b), Status::unsupported); }
  { auto b = c; b.experts_per_token = 0; EXPECT_EQ(status_of(b), Status::unsupported); }
  { auto b = c; b.hidden_dim = 60; EXPECT_EQ(status_of(b), Status::unsupported); }  // 120 bytes
  { auto b = c; b.hidden_dim = 64; b.scale_block = 48; EXPECT_EQ(status_of(b), Status::unsupported); }
  { auto b = c; b.out_dtype = FERRY_FP8_E4M3; EXPECT_EQ(status_of(b), Status::unsupported); }
  { auto b = c; int seven = 7; std::memcpy(&b.in_dtype, &seven, sizeof seven); EXPECT_EQ(status_of(b), Status::unsupported); }
  { auto b = c; b.dp_size = 3; EXPECT_NE(error_of(b).find("dp_size 3"), std::string::npos); }
  { auto b = c; b.max_tokens_per_rank = 0; EXPECT_EQ(status_of(b), Status::invalid_argument); }
  { auto b = c; b.private_tokens = 9; EXPECT_NE(error_of(b).find("private_tokens 9"), std::string::npos); }
  { auto b = c; b.expert_alignment = 0; EXPECT_EQ(status_of(b), Status::invalid_argument); }
  { auto b = c; b.world_size = 5000; b.num_experts = 5000; EXPECT_EQ(status_of(b), Status::invalid_argument); }
}

TEST(Config, Fp8PayloadNeedsSixteenBytesAndScaleBlockDividingHidden) {
  auto c = config(2, 4, 1, 4, 16);
  c.in_dtype = FERRY_FP8_E4M3;
  EXPECT_EQ(status_of(c), Status::ok);
  c.hidden_dim = 24;
  EXPECT_EQ(status_of(c), Status::unsupported);
  c.hidden_dim = 7168;
  c.scale_block = 128;
  EXPECT_EQ(status_of(c), Status::ok);
}

TEST(Layout, RecordIsHeaderPayloadScalesPaddedTo16) {
  auto c = config(64, 256, 8, 128, 7168);
  c.in_dtype = FERRY_FP8_E4M3;
  c.scale_block = 128;
  const Layout l = make_layout(c);
  EXPECT_EQ(l.experts_per_rank, 4);
  EXPECT_EQ(l.payload_bytes, 7168u);
  EXPECT_EQ(l.scale_bytes, 56u * 4);
  EXPECT_EQ(l.record_bytes, align_up(64 + 7168 + 224));
  EXPECT_EQ(l.count_header_bytes, align_up(4 * (64 + 4)));
  EXPECT_EQ(l.partial_bytes, 7168u * 2);
  EXPECT_EQ(l.private_tokens, 128);  // automatic: the whole run
  EXPECT_EQ(l.max_rows_per_expert, 64 * 128);
  // The receive region holds world_size * max_tokens records whatever the private split.
  auto c0 = c;
  c0.private_tokens = 0;
  const Layout l0 = make_layout(c0);
  EXPECT_EQ(l0.recv_buffer_bytes() - 64 * l0.count_header_bytes,
            l.recv_buffer_bytes() - 64 * l.count_header_bytes);
}

TEST(Layout, BufferSizesMatchTheLayout) {
  auto c = config(8, 32, 4, 16, 256);
  c.expert_alignment = 8;
  const ferry_buffer_sizes_t s = buffer_sizes_for(c);
  const Layout l = make_layout(c);
  EXPECT_EQ(s.record_bytes, l.record_bytes);
  EXPECT_EQ(s.send_bytes, 8 * l.count_header_bytes + 16 * 4 * l.record_bytes);
  EXPECT_EQ(s.recv_bytes, l.recv_buffer_bytes());
  EXPECT_EQ(s.total_registered_bytes, s.send_bytes + s.recv_bytes + s.combine_send_bytes + s.combine_recv_bytes);
  EXPECT_EQ(s.max_rows_per_expert, 128);
  EXPECT_EQ(s.num_local_experts, 4);
}

TEST(Routing, RejectsOutOfRangeIdsAndRepeatedExperts) {
  const Layout l = make_layout(config(2, 8, 2, 4, 64));
  const int32_t ok[] = {0, 7, -1, -1, 3, -1};
  EXPECT_NO_THROW(validate_routing(l, ok, 3));
  const int32_t too_big[] = {0, 8};
  try {
    validate_routing(l, too_big, 1);
    FAIL() << "expert 8 of 8 accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("indices[0][1] = 8"), std::string::npos) << e.what();
  }
  const int32_t negative[] = {-2, 1};
  EXPECT_THROW(validate_routing(l, negative, 1), Error);
  const int32_t repeated[] = {0, 1, 5, 5};
  try {
    validate_routing(l, repeated, 2);
    FAIL() << "token naming expert 5 twice accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token 1 names expert 5 twice"), std::string::npos) << e.what();
  }
}

TEST(SendPlan, TokensTravelOncePerDestinationRankInSourceOrder) {
  // 4 ranks x 2 experts. Token 0 -> experts 0,1 (rank 0 twice), 5 (rank 2); token 1 -> 7, -1, 2;
  // token 2 -> no route; token 3 -> 6, 4, 0.
  const Layout l = make_layout(config(4, 8, 3, 4, 64));
  const int32_t idx[] = {0, 1, 5, 7, -1, 2, -1, -1, -1, 6, 4, 0};
  const SendPlan p = make_send_plan(l, idx, 4, 0);
  EXPECT_EQ(p.dest_count, (std::vector<int32_t>{2, 1, 2, 2}));
  EXPECT_EQ(p.dest_offset, (std::vector<int64_t>{0, 2, 3, 5, 7}));
  EXPECT_EQ(p.total_records, 7);
  EXPECT_EQ(p.token_num_dests, (std::vector<int32_t>{2, 2, 0, 3}));
  // Per (destination, local expert) routes.
  EXPECT_EQ(p.dest_expert_count, (std::vector<int32_t>{2, 1, 1, 0, 1, 1, 1, 1}));
  // Runs ordered by source token: rank 0 gets tokens 0, 3; rank 2 gets 0, 3; rank 3 gets 1, 3.
  EXPECT_EQ(p.slot_token, (std::vector<int32_t>{0, 3, 1, 0, 3, 1, 3}));
  EXPECT_EQ(p.slot_dest, (std::vector<int32_t>{0, 0, 1, 2, 2, 3, 3}));
  const int md = l.max_dests_per_token();
  EXPECT_EQ(p.token_slot[0 * md + 0], 0);  // token 0 -> rank 0, slot 0
  EXPECT_EQ(p.token_slot[0 * md + 1], 3);  // token 0 -> rank 2, slot 3
  EXPECT_EQ(p.token_slot[3 * md + 2], 6);  // token 3 -> rank 3, slot 6
}

TEST(SendPlan, DataParallelMembersSplitTokensByIndex) {
  auto c = config(4, 4, 1, 6, 64);
  c.dp_size = 2;
  const Layout l = make_layout(c);
  const int32_t idx[] = {0, 1, 2, 3, 0, 1};
  const SendPlan m0 = make_send_plan(l, idx, 6, 0), m1 = make_send_plan(l, idx, 6, 1);
  EXPECT_EQ(m0.dest_count, (std::vector<int32_t>{2, 0, 1, 0}));  // tokens 0, 2, 4
  EXPECT_EQ(m1.dest_count, (std::vector<int32_t>{0, 2, 0, 1}));  // tokens 1, 3, 5
  EXPECT_EQ(m0.total_records + m1.total_records, 6);
}

TEST(RecvPlan, RowsAreSourceRankMajorAndOverflowIsPackedBySender) {
  auto c = config(3, 6, 2, 5, 64);
  c.private_tokens = 2;
  c.rank = 1;
  c.expert_alignment = 4;
  const Layout l = make_layout(c);
  // count_matrix[s][d]; this rank is 1.
  const int32_t counts[] = {0, 3, 0,   //
                            0, 1, 0,   //
                            0, 5, 0};
  // Routes from each sender to local experts 0, 1.
  const int32_t experts[] = {2, 2, 1, 0, 5, 1};
  const RecvPlan p = make_recv_plan(l, counts, experts);
  EXPECT_EQ(p.count, (std::vector<int32_t>{3, 1, 5}));
  EXPECT_EQ(p.record_base, (std::vector<int64_t>{0, 3, 4, 9}));
  EXPECT_EQ(p.overflow_before, (std::vector<int64_t>{0, 1, 1}));  // sender 0 overflows 1, sender 2 three
  EXPECT_EQ(p.expert_row_base, (std::vector<int32_t>{0, 0, 2, 2, 3, 2}));
  EXPECT_EQ(p.expert_count, (std::vector<int32_t>{8, 3}));
  EXPECT_EQ(p.expert_padded, (std::vector<int32_t>{8, 4}));
  EXPECT_EQ(l.recv_record_offset(2, 1, p.overflow_before[2]),
            l.recv_private_offset(2) + l.count_header_bytes + l.record_bytes);
  EXPECT_EQ(l.recv_record_offset(2, 3, p.overflow_before[2]), l.overflow_offset() + 2 * l.record_bytes);
  EXPECT_EQ(overflow_before(l, counts, 2, 1), 1);
}

TEST(RecvPlan, CombineSlotsFollowTheSendersRunsAndDpMembers) {
  auto c = config(4, 4, 1, 8, 64);
  c.dp_size = 2;
  const Layout l = make_layout(c);
  const int32_t counts[] = {1, 2, 3, 4,  //
                            5, 6, 7, 8,  //
                            0, 0, 0, 0,  //
                            1, 1, 1, 1};
  EXPECT_EQ(combine_slot_base(l, counts, 0, 2), 3);           // member 0: runs to ranks 0, 1 first
  EXPECT_EQ(combine_slot_base(l, counts, 1, 0), 10);          // member 1 after all of member 0
  EXPECT_EQ(combine_slot_base(l, counts, 1, 3), 10 + 18);
  EXPECT_EQ(combine_slot_base(l, counts, 3, 2), 0 + 2);       // group 1: member 0 sent nothing
}

TEST(RecordHeader, ChecksEveryFieldAPeerCouldLieAbout) {
  auto c = config(4, 16, 4, 8, 64);
  const Layout l = make_layout(c);
  RecordHeader h{};
  h.src_rank = 2;
  h.src_token = 5;
  h.num_routes = 2;
  h.local_expert[0] = 1;
  h.local_expert[1] = 3;
  EXPECT_EQ(check_record_header(l, h, 2, 4), nullptr);
  EXPECT_NE(check_record_header(l, h, 1, 4), nullptr);  // claims another rank
  EXPECT_NE(check_record_header(l, h, 2, 5), nullptr);  // not after the previous token
  auto bad = h;
  bad.src_token = 8;
  EXPECT_NE(check_record_header(l, bad, 2, -1), nullptr);
  bad = h;
  bad.num_routes = 5;
  EXPECT_NE(check_record_header(l, bad, 2, -1), nullptr);
  bad = h;
  bad.local_expert[1] = 4;
  EXPECT_NE(check_record_header(l, bad, 2, -1), nullptr);
  bad = h;
  bad.local_expert[1] = 1;
  EXPECT_NE(check_record_header(l, bad, 2, -1), nullptr);
}

TEST(Dtype, RoundsToNearestEven) {
  using namespace dtype;
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x3f808000u)), 0x3f80);  // tie -> even
  EXPECT_EQ(f32_to_bf16(f32_from_bits(0x3f818000u)), 0x3f82);
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(1e6f), 0x7c00);
  EXPECT_EQ(f32_to_f16(5.9604645e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_fp8e4m3(448.0f), 0x7e);
  EXPECT_EQ(f32_to_fp8e4m3(1000.0f), 0x7e);  // saturates
  EXPECT_EQ(f32_to_fp8e4m3(-1.0f), 0xb8);
  EXPECT_EQ(f32_to_fp8e4m3(0.001953125f), 0x01);  // 2^-9
  EXPECT_EQ(f32_to_fp8e4m3(1.0625f), 0x38);       // tie between 1 and 1.125 -> even (1)
  EXPECT_TRUE(std::isnan(fp8e4m3_to_f32(0x7f)));
}

TEST(Dtype, EveryEncodingRoundTrips) {
  using namespace dtype;
  for (uint32_t b = 0; b < 256; ++b) {
    if ((b & 0x7f) == 0x7f) continue;
    EXPECT_EQ(f32_to_fp8e4m3(fp8e4m3_to_f32(uint8_t(b))), b) << b;
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    if ((h & 0x7c00) == 0x7c00) continue;
    ASSERT_EQ(f32_to_f16(f16_to_f32(uint16_t(h))), h) << h;
    ASSERT_EQ(f32_to_bf16(bf16_to_f32(uint16_t(h))), h) << h;
  }
}

TEST(Dtype, RowHelpersMatchElementwiseConversion) {
  using namespace dtype;
  for (int type : {kBf16, kF16, kF32, kFp8E4M3}) {
    std::vector<uint8_t> row(64 * 4), back(64 * 4);
    for (int i = 0; i < 64; ++i) store(row.data(), type, i, float(i - 30) * 0.37f);
    std::vector<float> acc(64, 1.0f);
    axpy_row(acc.data(), row.data(), type, 0.5f, 64);
    for (int i = 0; i < 64; ++i) EXPECT_EQ(acc[i], 1.0f + 0.5f * load(row.data(), type, i)) << type << " " << i;
    store_row(back.data(), type, acc.data(), 64);
    for (int i = 0; i < 64; ++i) EXPECT_EQ(load(back.data(), type, i), round_to(type, acc[i])) << type << " " << i;
  }
}

// ---- quantize on dispatch: the shared cast (dtype.h) against the reference's own (reference.cpp) ----

// The fp8 conversion is the nearest e4m3 value, ties to even, saturating: on every bf16 value, on
// every tie between neighbouring fp8 values and the floats just around it, and on random floats.
TEST(Quantize, Fp8ConversionIsTheNearestValueTiesToEvenSaturating) {
  std::vector<float> values;
  for (uint32_t h = 0; h < 65536; ++h) values.push_back(dtype::bf16_to_f32(uint16_t(h)));
  for (int code = 0; code < 126; ++code) {
    const float mid = 0.5f * (dtype::fp8e4m3_to_f32(uint8_t(code)) + dtype::fp8e4m3_to_f32(uint8_t(code + 1)));
    for (float v : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      values.push_back(v);
      values.push_back(-v);
    }
  }
  uint64_t state = 7;
  for (int i = 0; i < 200000; ++i) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    values.push_back(dtype::f32_from_bits(uint32_t(state >> 32)));
  }
  for (float v : values) ASSERT_EQ(dtype::f32_to_fp8e4m3(v), reference::nearest_fp8(v)) << std::hexfloat << v;
  EXPECT_EQ(dtype::f32_to_fp8e4m3(INFINITY), 0x7e);
  EXPECT_EQ(dtype::f32_to_fp8e4m3(-INFINITY), 0xfe);
  EXPECT_EQ(dtype::f32_to_fp8e4m3(-0.0f), 0x80);
  EXPECT_EQ(dtype::f32_to_fp8e4m3(-NAN), 0x7f);  // the canonical NaN, sign dropped (cvt.rn.satfinite)
  EXPECT_EQ(dtype::f32x2_to_fp8e4m3x2(1.0f, -448.0f), 0xfe38);
}

// Blocks of every bf16 bit pattern (NaN, infinities, subnormals, both zeros included), cast with
// and without round_scale: the bytes and the scale of the shared block cast are the reference's.
TEST(Quantize, BlockCastOfEveryBf16ValueIsTheReferences) {
  for (int block : {8, 128, 256}) {
    for (bool round : {false, true}) {
      std::vector<uint16_t> x(65536);
      for (uint32_t h = 0; h < 65536; ++h) x[h] = uint16_t(h * 40503u);  // every pattern, blocks of mixed magnitude
      const auto want = reference::quantize_token(x.data(), 65536, block, round);
      std::vector<uint8_t> q(static_cast<size_t>(block));
      for (int b = 0; b < 65536 / block; ++b) {
        const float scale = dtype::quantize_block(x.data() + b * block, block, round, q.data());
        ASSERT_EQ(dtype::f32_bits(scale), dtype::f32_bits(want.scale[size_t(b)])) << "block " << b;
        ASSERT_EQ(0, std::memcmp(q.data(), want.q.data() + size_t(b) * block, size_t(block))) << "block " << b;
      }
    }
  }
}

TEST(Quantize, AZeroBlockGetsTheFloorScaleAndZeroBytesKeepingSigns) {
  std::vector<uint16_t> x(128, 0);
  x[5] = 0x8000;  // -0
  std::vector<uint8_t> q(128, 0xff);
  EXPECT_EQ(dtype::quantize_block(x.data(), 128, false, q.data()), FERRY_QUANTIZE_AMAX_FLOOR * (1.0f / 448.0f));
  EXPECT_EQ(q[0], 0x00);
  EXPECT_EQ(q[5], 0x80);
  EXPECT_EQ(dtype::quantize_block(x.data(), 128, true, q.data()), std::ldexp(1.0f, -22));
}

TEST(Quantize, RoundedScalesAreThePowerOfTwoAtOrAboveAmaxOver448) {
  for (float amax : {1.0f, 448.0f, 449.0f, 896.0f, 0.001f, 3.0e38f, 1.5f}) {
    const auto rounded = dtype::fp8_block_scale(amax, true);
    const float exact = amax * (1.0f / 448.0f);
    int e = 0;
    EXPECT_EQ(std::frexp(rounded.scale, &e), 0.5f) << amax;  // a power of two
    EXPECT_GE(rounded.scale, exact) << amax;
    EXPECT_LT(rounded.scale, 2 * exact) << amax;
    EXPECT_EQ(rounded.scale * rounded.multiplier, 1.0f) << amax;
  }
  EXPECT_EQ(dtype::fp8_block_scale(448.0f, true).scale, 1.0f);
  EXPECT_EQ(dtype::ue8m0_of(1.0f), 127);
  EXPECT_EQ(dtype::ue8m0_of(std::ldexp(1.0f, -22)), 105);
}

// Every scale slot of every row has its own place inside the buffer, in each layout, where ferry.h
// says (and where DeepEP's strides put it).
TEST(Quantize, EveryScaleLayoutPlacesEachSlotOnceInsideTheBuffer) {
  auto c = config(2, 6, 2, 5, 640);  // 3 local experts, 10 rows each, 5 scales of 128
  c.in_dtype = FERRY_FP8_E4M3;
  c.scale_block = 128;
  c.expert_alignment = 1;
  const Layout l = make_layout(c);
  for (int layout : {kScaleRowMajor, kScaleColumnMajor, kScaleUe8m0ColumnMajor}) {
    const uint64_t bytes = l.out_scale_buffer_bytes(layout);
    const uint64_t width = layout == kScaleUe8m0ColumnMajor ? 1 : 4;
    std::vector<int> hits(bytes, 0);
    for (int64_t row = 0; row < int64_t(l.experts_per_rank) * l.max_rows_per_expert; ++row)
      for (int s = 0; s < l.out_scale_slots(layout); ++s) {
        const uint64_t at = l.out_scale_offset(layout, row, s);
        ASSERT_LE(at + width, bytes);
        for (uint64_t b = at; b < at + width; ++b) ++hits[b];
      }
    EXPECT_EQ(std::count(hits.begin(), hits.end(), 1), int64_t(bytes)) << "layout " << layout;
  }
  // Expert 2, row 7, scale 3: DeepEP strides (M * S, 1, M) in floats; UE8M0 word 0 byte 3.
  const int M = l.max_rows_per_expert;
  EXPECT_EQ(l.out_scale_offset(kScaleColumnMajor, 2 * M + 7, 3), uint64_t(2 * M * 5 + 3 * M + 7) * 4);
  EXPECT_EQ(l.out_scale_offset(kScaleUe8m0ColumnMajor, 2 * M + 7, 3), uint64_t(2 * M * 2 + 0 * M + 7) * 4 + 3);
  EXPECT_EQ(l.out_scale_offset(kScaleUe8m0ColumnMajor, 2 * M + 7, 4), uint64_t(2 * M * 2 + 1 * M + 7) * 4 + 0);
}

// The front door refuses what a dispatch asks and the all-to-all cannot honour, naming it.
std::string dispatch_error(const Layout& l, const ferry_dispatch_args_t& a) {
  try {
    check_dispatch_args(l, a, Site{l.rank, 0, "dispatch"});
    return "";
  } catch (const Error& e) {
    EXPECT_EQ(e.status(), Status::invalid_argument) << e.what();
    return e.what();
  }
}

TEST(Quantize, ArgumentsTheAllToAllCannotHonourAreRefusedNamingThem) {
  auto c = config(2, 4, 2, 8, 1024);
  c.in_dtype = FERRY_FP8_E4M3;
  c.scale_block = 128;
  const Layout fp8 = make_layout(c);
  const uint16_t x[1] = {};
  const int32_t idx[2] = {0, 1};
  const float w[2] = {1, 1}, scale[8] = {};
  ferry_dispatch_args_t a{};
  a.dp_x = x;
  a.indices = idx;
  a.weights = w;
  a.num_tokens = 1;
  a.flags = FERRY_SEND;
  a.quantize = FERRY_QUANTIZE_FP8_BLOCK;
  EXPECT_EQ(dispatch_error(fp8, a), "");
  a.round_scale = 1;
  EXPECT_EQ(dispatch_error(fp8, a), "");
  a.dp_x_scale = scale;
  EXPECT_NE(dispatch_error(fp8, a).find("dp_x_scale must be NULL with quantize"), std::string::npos);
  a.dp_x_scale = nullptr;
  a.round_scale = 2;
  EXPECT_NE(dispatch_error(fp8, a).find("round_scale 2 must be 0 or 1"), std::string::npos);
  a.round_scale = 1;
  a.quantize = FERRY_QUANTIZE_NONE;
  a.dp_x_scale = scale;
  EXPECT_NE(dispatch_error(fp8, a).find("round_scale 1 with FERRY_QUANTIZE_NONE"), std::string::npos);
  a.round_scale = 0;
  int seven = 7;
  std::memcpy(&a.quantize, &seven, sizeof seven);
  EXPECT_NE(dispatch_error(fp8, a).find("quantize 7 is not a ferry_quantize_t"), std::string::npos);
  a.quantize = FERRY_QUANTIZE_FP8_BLOCK;
  a.dp_x_scale = nullptr;

  auto bf16 = config(2, 4, 2, 8, 1024);
  EXPECT_NE(dispatch_error(make_layout(bf16), a).find("this all-to-all carries bf16"), std::string::npos);
  auto odd = c;
  odd.hidden_dim = 960;
  odd.scale_block = 48;
  EXPECT_NE(dispatch_error(make_layout(odd), a).find("power of two in [8, 256]"), std::string::npos);
  odd.scale_block = 4;
  EXPECT_NE(dispatch_error(make_layout(odd), a).find("has scale_block 4"), std::string::npos);

  ferry_dispatch_args_t r{};
  r.flags = FERRY_RECV;
  uint8_t out[64];
  int32_t counts[2];
  r.out_expert_num_tokens = counts;
  r.out_expert_x = out;
  r.out_expert_x_scale = reinterpret_cast<float*>(out);
  r.out_scale_layout = FERRY_SCALE_UE8M0_COLUMN_MAJOR;
  EXPECT_EQ(dispatch_error(fp8, r), "");
  std::memcpy(&r.out_scale_layout, &seven, sizeof seven);
  EXPECT_NE(dispatch_error(fp8, r).find("out_scale_layout 7 is not a ferry_scale_layout_t"), std::string::npos);
  r.out_scale_layout = FERRY_SCALE_COLUMN_MAJOR;
  r.out_expert_x_scale = nullptr;
  EXPECT_NE(dispatch_error(make_layout(bf16), r).find("FERRY_SCALE_COLUMN_MAJOR lays out scales, and this all-to-all "
                                                      "carries none"),
            std::string::npos);
}

// ---- weights at combine ------------------------------------------------------------------------

// A slot holds one row per route of its record; route k of a token names its row: the slot of the
// token's record to that rank times the rows per slot, plus its place among the token's routes
// there (top-k order, as the record header lists them).
TEST(WeightsAtCombine, EveryRouteHasItsRowInItsRecordsSlot) {
  auto c = config(2, 8, 3, 4, 64);  // 4 experts per rank: up to 3 rows per slot
  c.combine_weights = FERRY_WEIGHTS_AT_COMBINE;
  const Layout l = make_layout(c);
  EXPECT_EQ(l.combine_rows, 3);
  EXPECT_EQ(l.combine_slot_bytes(), 3 * l.partial_bytes);
  EXPECT_EQ(l.combine_recv_bytes(), uint64_t(l.max_send_records()) * 3 * l.partial_bytes);
  // Token 0 -> experts 5 (rank 1), 1 (rank 0), 4 (rank 1); token 1 -> -1, 6 (rank 1), -1; token 2 -> 0, 2, 3.
  const int32_t idx[] = {5, 1, 4, -1, 6, -1, 0, 2, 3};
  const SendPlan p = make_send_plan(l, idx, 3, 0);
  // Runs: rank 0 gets tokens 0, 2 (slots 0, 1); rank 1 tokens 0, 1 (slots 2, 3).
  EXPECT_EQ(p.slot_routes, (std::vector<int32_t>{1, 3, 2, 1}));
  EXPECT_EQ(p.route_row, (std::vector<int32_t>{2 * 3 + 0, 0 * 3 + 0, 2 * 3 + 1, -1, 3 * 3 + 0, -1, 3, 4, 5}));
  const SendPlan partial = make_send_plan(make_layout(config(2, 8, 3, 4, 64)), idx, 3, 0);
  EXPECT_EQ(partial.route_row, std::vector<int32_t>(9, -1));
}

TEST(WeightsAtCombine, TheConfigAndTheCallsSayWhereTheWeightsAre) {
  auto c = config(4, 8, 2, 8, 64);
  c.combine_weights = FERRY_WEIGHTS_AT_COMBINE;
  c.dp_size = 2;
  EXPECT_EQ(status_of(c), Status::unsupported);
  EXPECT_NE(error_of(c).find("FERRY_WEIGHTS_AT_COMBINE supports dp_size 1"), std::string::npos);
  c.dp_size = 1;
  int five = 5;
  std::memcpy(&c.combine_weights, &five, sizeof five);
  EXPECT_NE(error_of(c).find("combine_weights 5 is not a ferry_combine_weights_t"), std::string::npos);
  c.combine_weights = FERRY_WEIGHTS_AT_COMBINE;
  const Layout l = make_layout(c);
  const int32_t idx[2] = {0, 1};
  const uint8_t x[128] = {};
  ferry_dispatch_args_t d{};
  d.dp_x = x;
  d.indices = idx;
  d.num_tokens = 1;
  d.flags = FERRY_SEND;
  EXPECT_EQ(dispatch_error(l, d), "");  // no weights at dispatch
  ferry_combine_args_t cb{};
  uint8_t out[128];
  cb.out_tokens = out;
  cb.num_tokens = 1;
  cb.flags = FERRY_RECV;
  try {
    check_combine_args(l, cb, 1, Site{0, 0, "combine RECV"});
    ADD_FAILURE() << "combine RECV without weights accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("weights must not be NULL with 1 tokens: this all-to-all takes them at combine"),
              std::string::npos)
        << e.what();
  }
}

TEST(Reference, InputsDependOnlyOnSeedAndGroup) {
  auto c = config(4, 8, 2, 6, 64);
  c.dp_size = 2;
  reference::InputSpec spec;
  spec.seed = 42;
  const auto a = reference::generate_input(c, spec, 2), b = reference::generate_input(c, spec, 3);
  EXPECT_EQ(a.indices, b.indices);
  EXPECT_EQ(a.x, b.x);
  EXPECT_NE(reference::generate_input(c, spec, 0).indices, a.indices);
  spec.seed = 43;
  EXPECT_NE(reference::generate_input(c, spec, 2).x, a.x);
}

TEST(Reference, RoutingModesShapeTheExpertLoad) {
  auto c = config(4, 16, 4, 64, 64);
  reference::InputSpec spec;
  spec.routing = reference::Routing::one_expert;
  const auto all = reference::generate_all(c, spec);
  const int hot = all[0].indices[0];
  for (const auto& in : all)
    for (int t = 0; t < in.num_tokens; ++t) EXPECT_EQ(in.indices[size_t(t) * 4], hot);
  spec.routing = reference::Routing::uniform;
  spec.drop_fraction = 0.3;
  const auto dropped = reference::generate_input(c, spec, 1);
  EXPECT_EQ(std::count(dropped.indices.begin() + 3 * 4, dropped.indices.begin() + 4 * 4, -1), 4);  // token 3
  spec = {};
  spec.zero_tokens_every = 2;
  EXPECT_EQ(reference::generate_input(c, spec, 1).num_tokens, 0);
  EXPECT_EQ(reference::generate_input(c, spec, 2).num_tokens, 64);
}

TEST(Reference, SteepZipfLawStillGivesEveryTokenDistinctExperts) {
  // s = 10 puts ~99.9 % of each draw on one expert: redrawing until a free expert comes up would
  // take forever for the later routes of a top-8 over 8 experts.
  auto c = config(2, 8, 8, 64, 64);
  reference::InputSpec spec;
  spec.routing = reference::Routing::zipf;
  spec.zipf_s = 10;
  const auto in = reference::generate_input(c, spec, 0);
  std::vector<int> first(8, 0);
  for (int t = 0; t < in.num_tokens; ++t) {
    std::vector<int32_t> row(in.indices.begin() + t * 8, in.indices.begin() + (t + 1) * 8);
    ++first[row[0]];
    std::sort(row.begin(), row.end());
    EXPECT_EQ(row, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7})) << "token " << t;
  }
  EXPECT_GE(*std::max_element(first.begin(), first.end()), in.num_tokens - 2) << "the law's head leads";
}

TEST(Reference, DispatchCountsEveryRouteOnce) {
  auto c = config(4, 8, 3, 10, 64);
  c.expert_alignment = 4;
  reference::InputSpec spec;
  spec.drop_fraction = 0.2;
  const auto all = reference::generate_all(c, spec);
  int64_t routes = 0;
  for (const auto& in : all) routes += std::count_if(in.indices.begin(), in.indices.end(), [](int e) { return e >= 0; });
  int64_t rows = 0;
  for (int r = 0; r < 4; ++r) {
    const auto out = reference::dispatch(c, all, r);
    for (int e = 0; e < 2; ++e) {
      rows += out.expert_num_tokens[e];
      EXPECT_EQ(out.expert_padded_rows[e] % 4, 0);
    }
  }
  EXPECT_EQ(rows, routes);
}

TEST(Reference, CombineOfTheStandardModelMatchesTheGeneralForm) {
  auto c = config(2, 4, 2, 5, 32);
  c.out_dtype = FERRY_F32;
  const auto all = reference::generate_all(c, {});
  std::vector<std::vector<uint8_t>> y(2);
  for (int r = 0; r < 2; ++r) {
    auto cr = c;
    cr.rank = r;
    const Layout l = make_layout(cr);
    const auto d = reference::dispatch(cr, all, r);
    y[r].resize(size_t(l.experts_per_rank) * l.max_rows_per_expert * l.out_row_bytes());
    reference::apply_experts(l, d.expert_num_tokens.data(), d.expert_x.data(), nullptr, y[r].data());
  }
  const Layout l = make_layout(c);
  const auto general = reference::combine(c, all, 0, [&](int rank, int e, int row) -> const void* {
    return y[rank].data() + (size_t(e) * l.max_rows_per_expert + row) * l.out_row_bytes();
  });
  const auto standard = reference::combine_standard(c, all[0]);
  ASSERT_EQ(general.size(), standard.size());
  for (size_t i = 0; i < general.size(); ++i) EXPECT_FLOAT_EQ(general[i], standard[i]) << i;
}

// ---- count headers, as a receiver reads them ----------------------------------------------------

TEST(CountHeader, ValidHeadersPassAndEachLieIsNamed) {
  auto c = config(4, 8, 2, 8, 64);
  c.rank = 1;
  const Layout l = make_layout(c);
  // counts[world_size] then this rank's expert counts[experts_per_rank], as a sender writes them.
  auto check = [&](std::vector<int32_t> header) {
    std::vector<int32_t> counts(4), experts(2);
    header.resize(l.count_header_bytes / 4, 0);
    return check_count_header(l, header.data(), counts.data(), experts.data());
  };
  EXPECT_EQ(check({3, 5, 0, 8, 4, 2}), "");  // 5 records to rank 1, 6 rows over its 2 experts
  EXPECT_EQ(check({kPoisonCount, 0, 0, 0, 0, 0}), "reports that its dispatch failed (invalid input on that rank)");
  EXPECT_EQ(check({3, 9, 0, 0, 9, 0}), "claims 9 records for rank 1, outside [0, max_tokens=8]");
  EXPECT_EQ(check({0, 5, -1, 0, 5, 0}), "claims -1 records for rank 2, outside [0, max_tokens=8]");
  EXPECT_EQ(check({0, 5, 0, 0, 6, 0}), "claims 6 rows for local expert 0 out of 5 records");
  EXPECT_EQ(check({0, 5, 0, 0, 2, 2}), "claims 4 expert rows for 5 records");    // fewer rows than records
  EXPECT_EQ(check({0, 2, 0, 0, 2, 2}), "");                                      // two routes each
  EXPECT_EQ(check({0, 1, 0, 0, 1, 1}), "");
}

// ---- the ranks' agreement on the config, from what each rank sent -------------------------------

std::vector<uint8_t> descriptions(const std::vector<ferry_a2a_config_t>& configs) {
  std::vector<uint8_t> all(configs.size() * kAgreementBytes);
  for (size_t r = 0; r < configs.size(); ++r) {
    const ConfigAgreement a = describe_config(configs[r], int(r), "tcp", Status::ok, "");
    std::memcpy(all.data() + r * kAgreementBytes, &a, sizeof a);
  }
  return all;
}

ConfigAgreement* description(std::vector<uint8_t>& all, int rank) {
  return reinterpret_cast<ConfigAgreement*>(all.data() + size_t(rank) * kAgreementBytes);
}

TEST(Agreement, EqualConfigsAgreeWhateverEachRanksOwnFields) {
  std::vector<ferry_a2a_config_t> cs(3, config(3, 6, 2, 8, 64));
  cs[1].expert_alignment = 16;
  cs[2].timeout_ms = 1000;
  cs[2].cuda_device = 3;
  cs[2].private_tokens = 8;  // as resolved from -1 on the others
  const AgreementOutcome out = check_agreement(descriptions(cs), 3, 0);
  EXPECT_EQ(out.status, Status::ok);
  EXPECT_EQ(out.message, "");
}

TEST(Agreement, ABuildOfAnotherWireVersionOrNoFerryConfigAtAllIsNamed) {
  std::vector<uint8_t> all = descriptions(std::vector<ferry_a2a_config_t>(4, config(4, 8, 2, 8, 64)));
  description(all, 2)->wire_version = kWireVersion + 1;
  std::memset(description(all, 3), 0xab, kAgreementBytes);
  const AgreementOutcome out = check_agreement(all, 4, 0);
  EXPECT_EQ(out.status, Status::invalid_argument);
  EXPECT_NE(out.message.find("rank 3 sent no Ferry config description"), std::string::npos) << out.message;
  EXPECT_NE(out.message.find("rank 2 has wire version " + std::to_string(kWireVersion + 1)), std::string::npos)
      << out.message;
  EXPECT_NE(out.message.find("this build speaks wire version " + std::to_string(kWireVersion)), std::string::npos)
      << out.message;
}

TEST(Agreement, EveryRankReadsTheSameAccountOfADifference) {
  std::vector<ferry_a2a_config_t> cs(4, config(4, 8, 2, 8, 64));
  cs[1].hidden_dim = cs[3].hidden_dim = 128;
  const std::vector<uint8_t> all = descriptions(cs);
  const std::string seen_by_0 = check_agreement(all, 4, 0).message;
  EXPECT_NE(seen_by_0.find("hidden_dim: rank 0 has 64, rank 1 has 128, rank 3 has 128 (2 of 4 ranks differ from rank 0)"),
            std::string::npos)
      << seen_by_0;
  for (int me = 1; me < 4; ++me) EXPECT_EQ(check_agreement(all, 4, me).message, seen_by_0);
}

// At the largest world size, with every field and every rank different, the text names a few ranks
// per field and counts the rest.
TEST(Agreement, TheAccountStaysShortAtAnyWorldSize) {
  const int world = FERRY_MAX_RANKS;
  std::vector<uint8_t> all = descriptions(std::vector<ferry_a2a_config_t>(world, config(world, world, 2, 8, 64)));
  for (int r = 1; r < world; ++r) {
    ConfigAgreement* a = description(all, r);
    for (int32_t* field : {&a->num_experts, &a->experts_per_token, &a->max_tokens_per_rank, &a->hidden_dim,
                           &a->in_dtype, &a->scale_block, &a->out_dtype, &a->private_tokens, &a->dp_size,
                           &a->device, &a->nets_per_rank, &a->combine_weights})
      *field += r;
    std::memset(a->provider, 'x', sizeof a->provider);  // no NUL: read up to the field's end only
    a->status = int32_t(Status::unsupported);
    std::memset(a->error, '\x01', sizeof a->error);
  }
  const AgreementOutcome out = check_agreement(all, world, 0);
  const ConfigAgreement a0{};
  EXPECT_EQ(out.status, Status::invalid_argument);
  EXPECT_LT(out.message.size(), 4096u) << out.message;
  EXPECT_NE(out.message.find("and 4091 more (4095 of 4096 ranks differ from rank 0)"), std::string::npos);
  EXPECT_NE(out.message.find("rank 1 has \"" + std::string(32, 'x') + "\""), std::string::npos) << out.message;
  EXPECT_NE(out.message.find("(" + std::string(sizeof a0.error, '?') + ")"), std::string::npos) << out.message;
  EXPECT_NE(out.message.find("so do those of ranks 2, 3, 4, 5 and 4090 others"), std::string::npos) << out.message;
}

// ---- the host backend's helper threads ---------------------------------------------------------

TEST(WorkPool, PartsCoverEveryItemOnceAndNeverGoBelowTheMinimumPart) {
  host::WorkPool pool(4);
  EXPECT_EQ(pool.threads(), 4);
  for (int64_t n : {0, 1, 5, 7, 64, 1000, 1001}) {
    for (int64_t min_part : {1, 3, 100}) {
      std::vector<std::atomic<int>> hits(size_t(n) + 1);
      std::atomic<int> parts{0};
      std::atomic<int64_t> smallest{n + 1};
      pool.parallel_for(n, min_part, [&](int64_t begin, int64_t end) {
        ++parts;
        int64_t s = smallest.load();
        while (end - begin < s && !smallest.compare_exchange_weak(s, end - begin)) {
        }
        for (int64_t i = begin; i < end; ++i) ++hits[size_t(i)];
      });
      for (int64_t i = 0; i < n; ++i) EXPECT_EQ(hits[size_t(i)].load(), 1) << "n " << n << " item " << i;
      EXPECT_LE(parts.load(), std::max<int64_t>(1, std::min<int64_t>(4, n / min_part))) << "n " << n;
      if (parts.load() > 1) {
        EXPECT_GE(smallest.load(), min_part) << "n " << n;
      }
    }
  }
}

TEST(WorkPool, AnExceptionInAnyPartReachesTheCallerAndThePoolStaysUsable) {
  host::WorkPool pool(3);
  for (int throwing_part = 0; throwing_part < 3; ++throwing_part) {
    EXPECT_THROW(pool.parallel_for(30, 1,
                                   [&](int64_t begin, int64_t) {
                                     if (begin / 10 == throwing_part) throw std::runtime_error("part failed");
                                   }),
                 std::runtime_error);
    std::atomic<int64_t> sum{0};
    pool.parallel_for(30, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) sum += i;
    });
    EXPECT_EQ(sum.load(), 29 * 30 / 2);
  }
}

TEST(WorkPool, ThousandsOfBackToBackCallsEachWaitForAllTheirParts) {
  host::WorkPool pool(3);
  std::vector<int> data(300);
  for (int round = 1; round <= 3000; ++round) {
    pool.parallel_for(int64_t(data.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) data[size_t(i)] = round;
    });
    ASSERT_TRUE(std::all_of(data.begin(), data.end(), [&](int v) { return v == round; })) << "round " << round;
  }
}

TEST(WorkPool, FerryHostThreadsIsTakenWhenSaneAndRefusedOtherwise) {
  setenv("FERRY_HOST_THREADS", "5", 1);
  EXPECT_EQ(host::host_threads(8), 5);
  for (const char* bad : {"0", "65", "two", "3x", "-1"}) {
    setenv("FERRY_HOST_THREADS", bad, 1);
    try {
      host::host_threads(1);
      ADD_FAILURE() << bad << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.status(), Status::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("FERRY_HOST_THREADS"), std::string::npos) << e.what();
    }
  }
  unsetenv("FERRY_HOST_THREADS");
  const int automatic = host::host_threads(1);
  EXPECT_GE(automatic, 1);
  EXPECT_LE(automatic, 8);
  EXPECT_EQ(host::host_threads(1000), 1);  // more ranks than cores: no helpers
}

}  // namespace
}  // namespace ferry::ep
