// The CUDA kernels against the host backend's pack/unpack/combine on identical fresh random inputs,
// for ranks simulated in one process on one GPU (loopback copies stand in for the network, placed
// where the Protocol's writes land). Dispatch bytes and counts must be identical, outputs are
// poisoned before every run, and combine must also match the fp32 reference within tolerance.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "csrc/backend.h"
#include "csrc/cuda/api.cuh"
#include "csrc/cuda/configs.cuh"
#include "csrc/cuda/loopback.h"
#include "csrc/cuda/memory.h"
#include "csrc/dtype.h"
#include "csrc/host/pack.h"
#include "csrc/plan.h"
#include "csrc/reference.h"
#include "tests/common/a2a_case.h"
#include "tests/common/cuda_copy.h"
#include "tests/cuda/gpu.h"

namespace ferry::cuda {
namespace {

using ep::reference::InputSpec;
using ep::reference::RankInput;
using ep::reference::Routing;
using testing::download;
using testing::upload;

constexpr uint8_t kPoison = 0xEE;

// The ranks simulated here exchange through loopback copies, not an engine: of the case, only the
// shape, dtypes and inputs (spec) matter. What a shape leaves out is the case's default: no scales,
// alignment 1, uniform routing without drops, the same token count on every rank.
struct Shape {
  const char* name;
  testing::A2aCase c;
};

void PrintTo(const Shape& s, std::ostream* os) { *os << s.name; }

ferry_a2a_config_t config_of(const Shape& s, int rank) { return testing::config_of(s.c, rank, FERRY_DEVICE_CUDA); }

void poison(void* dev, size_t bytes) { check_cuda(cudaMemset(dev, kPoison, bytes), "poison"); }

// Index of the first differing byte, or -1.
int64_t first_difference(const std::vector<uint8_t>& a, const std::vector<uint8_t>& b) {
  if (a.size() != b.size()) return 0;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return int64_t(i);
  return -1;
}

// One simulated rank: its inputs and every buffer the kernels touch, in device memory.
struct SimRank {
  ep::Layout L;
  int scale_layout;  // of out_x_scale (ferry_scale_layout_t)
  RankInput in;
  int bound = 0;  // this step's token count (<= L.max_tokens)
  DeviceBuffer x, x_scale, indices, weights, bound_m;
  DeviceBuffer send, recv, partials, combine_recv;
  DeviceBuffer ws_dev, out_num, out_x, out_x_scale, expert_y, out_tokens, out_src_token, out_per_rank;
  MappedHostBuffer ws_host;
  Workspace ws{};

  SimRank(const ep::Layout& layout, int out_scale_layout)
      : L(layout),
        scale_layout(out_scale_layout),
        x(uint64_t(L.max_tokens) * x_row_bytes(true)),
        x_scale(uint64_t(L.max_tokens) * L.num_scales * 4),
        indices(uint64_t(L.max_tokens) * L.top_k * 4),
        weights(uint64_t(L.max_tokens) * L.top_k * 4),
        bound_m(4),
        send(L.send_buffer_bytes()),
        recv(L.recv_buffer_bytes()),
        partials(L.combine_send_bytes()),
        combine_recv(L.combine_recv_bytes()),
        ws_dev(workspace_device_bytes(L)),
        out_num(uint64_t(L.experts_per_rank) * 4),
        out_x(rows() * L.payload_bytes),
        out_x_scale(L.out_scale_buffer_bytes(scale_layout)),
        expert_y(rows() * L.out_row_bytes()),
        out_tokens(uint64_t(L.max_tokens) * L.out_row_bytes()),
        out_src_token(rows() * 4),
        out_per_rank(uint64_t(L.experts_per_rank) * L.world_size * 4),
        ws_host(workspace_host_bytes(L)) {
    check_cuda(cudaMemset(ws_dev.get(), 0, ws_dev.bytes()), "memset workspace");
    std::memset(ws_host.host(), 0, ws_host.bytes());
    ws = carve_workspace(L, ws_dev.get(), ws_host.dev());
    prepare_kernels(L);
  }
  uint64_t rows() const { return uint64_t(L.experts_per_rank) * L.max_rows_per_expert; }
  // Bytes of one input token: bf16 when the rank quantizes on dispatch.
  uint64_t x_row_bytes(bool quantize) const { return quantize ? std::max<uint64_t>(L.payload_bytes, uint64_t(L.hidden) * 2) : L.payload_bytes; }
  DeviceError error() const { return *ws_host.host<DeviceError>(); }
  void clear_error() { std::memset(ws_host.host<DeviceError>(), 0, sizeof(DeviceError)); }

  // Inputs for a step: x rows past `bound` are garbage the kernels must not read into records.
  void set_input(const RankInput& input, int step_tokens) {
    in = input;
    bound = step_tokens;
    upload(x.get(), in.x.data(), in.x.size());
    upload(x_scale.get(), in.x_scale.data(), in.x_scale.size() * 4);
    upload(indices.get(), in.indices.data(), in.indices.size() * 4);
    upload(weights.get(), in.weights.data(), in.weights.size() * 4);
    upload(bound_m.get(), &bound, 4);
  }

  DispatchSendParams send_params() const {
    // With weights at combine dispatch gets none: the kernels must not read them.
    DispatchSendParams p{L, x.get(), L.num_scales && !in.quantize ? x_scale.get<float>() : nullptr,
                         indices.get<int32_t>(), L.weights_at_combine ? nullptr : weights.get<float>(),
                         bound_m.get<int32_t>(), in.num_tokens, send.get<uint8_t>()};
    p.quantize = in.quantize;
    p.round_scale = in.round_scale;
    return p;
  }
  DispatchRecvParams recv_params() const {
    DispatchRecvParams p{L, recv.get<uint8_t>(), nullptr, kDefaultWaitTimeoutNs, out_num.get<int32_t>(), out_x.get(),
                         L.num_scales ? out_x_scale.get<float>() : nullptr};
    p.scale_layout = scale_layout;
    p.out_src_token = out_src_token.get<int32_t>();
    p.out_num_tokens_per_rank = out_per_rank.get<int32_t>();
    return p;
  }
  // The received scales as the row-major fp32 the expert model reads.
  std::vector<float> scale_rows(const ferry_a2a_config_t& config) const {
    if (L.num_scales == 0) return {};
    if (scale_layout == ep::kScaleRowMajor) return download<float>(out_x_scale.get(), rows() * L.num_scales);
    return ep::reference::scales_as_rows(config, scale_layout, download<uint8_t>(out_x_scale.get(), out_x_scale.bytes()).data());
  }
  CombineSendParams combine_send_params() const { return {L, expert_y.get(), partials.get<uint8_t>()}; }
  CombineRecvParams combine_recv_params(bool accumulate) const {
    CombineRecvParams p{L, combine_recv.get<uint8_t>(), nullptr, kDefaultWaitTimeoutNs, out_tokens.get(), accumulate};
    if (L.weights_at_combine) p.weights = weights.get<float>();
    return p;
  }
};

int num_sms() {
  int dev = 0, n = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev), "sm count");
  return n;
}

// What the host backend computes for the same step, stage by stage, on the same bytes.
struct HostStep {
  std::vector<ep::SendPlan> plans;         // per rank
  std::vector<int32_t> count_matrix;       // [R * R]
  std::vector<std::vector<uint8_t>> send;  // per rank, from a poisoned buffer
};

class KernelsVsHost : public ::testing::TestWithParam<Shape> {
 protected:
  void SetUp() override { FERRY_REQUIRE_GPU(); }
};

// Random expert outputs in out_dtype (rounded through the shared conversions).
std::vector<uint8_t> random_expert_y(const ep::Layout& L, uint64_t rows, uint64_t seed) {
  std::vector<uint8_t> y(rows * L.out_row_bytes());
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  for (uint64_t i = 0; i < rows * uint64_t(L.hidden); ++i) ep::dtype::store(y.data(), L.out_dtype, int64_t(i), u(rng));
  return y;
}

// Runs one whole step through the kernels and the host functions side by side, asserting equality
// at every stage. `bounds[r]` is rank r's device-side token count.
void run_and_compare(std::vector<std::unique_ptr<SimRank>>& ranks, const ferry_a2a_config_t& base,
                     const std::vector<RankInput>& inputs, uint64_t seed) {
  const int R = base.world_size;
  const int sms = num_sms();
  std::vector<RankInput> bounded(R);  // what the host sees: exactly bound tokens
  for (int r = 0; r < R; ++r) {
    SimRank& k = *ranks[r];
    bounded[r] = inputs[r];
    const int n = bounded[r].num_tokens;
    // The device gets the full max_tokens rows plus garbage; bound_m says how many are real.
    RankInput padded = inputs[r];
    padded.num_tokens = k.L.max_tokens;
    padded.x.resize(uint64_t(k.L.max_tokens) * (padded.quantize ? uint64_t(k.L.hidden) * 2 : k.L.payload_bytes), 0x5A);
    if (!padded.quantize) padded.x_scale.resize(uint64_t(k.L.max_tokens) * k.L.num_scales, 7.f);
    padded.indices.resize(uint64_t(k.L.max_tokens) * k.L.top_k, 1 << 30);  // invalid if ever read
    padded.weights.resize(uint64_t(k.L.max_tokens) * k.L.top_k, 1.f);
    k.set_input(padded, n);
  }

  // --- dispatch send: byte-identical send buffers, counts in the proxy's mirror.
  HostStep h;
  h.count_matrix.assign(size_t(R) * R, 0);
  for (int r = 0; r < R; ++r) {
    SimRank& k = *ranks[r];
    poison(k.send.get(), k.send.bytes());
    dispatch_send(k.send_params(), k.ws, sms, nullptr);
    ep::validate_routing(k.L, bounded[r].indices.data(), bounded[r].num_tokens);
    h.plans.push_back(ep::make_send_plan(k.L, bounded[r].indices.data(), bounded[r].num_tokens, 0));
    std::vector<uint8_t> hs(k.send.bytes(), kPoison);
    ep::host::pack_dispatch(k.L, h.plans[r], bounded[r].x.data(),
                            k.L.num_scales && !bounded[r].quantize ? bounded[r].x_scale.data() : nullptr,
                            bounded[r].indices.data(), k.L.weights_at_combine ? nullptr : bounded[r].weights.data(),
                            hs.data(),
                            {bounded[r].quantize, bounded[r].round_scale});
    for (int d = 0; d < R; ++d) h.count_matrix[size_t(r) * R + d] = h.plans[r].dest_count[d];
    h.send.push_back(std::move(hs));
  }
  check_cuda(cudaDeviceSynchronize(), "dispatch_send");
  for (int r = 0; r < R; ++r) {
    SimRank& k = *ranks[r];
    ASSERT_EQ(k.error().code, kErrNone) << "rank " << r << ": " << device_error_name(k.error().code);
    const auto dev = download<uint8_t>(k.send.get(), k.send.bytes());
    ASSERT_EQ(first_difference(dev, h.send[r]), -1) << "rank " << r << " send buffer differs from the host's pack";
    // The proxy thread reads the counts from mapped host memory (same address on host and device).
    for (int d = 0; d < R; ++d) EXPECT_EQ(k.ws.host_dest_count[d], h.plans[r].dest_count[d]) << "rank " << r;
  }

  // --- loopback, then dispatch recv: identical outputs and counts from identical receive buffers.
  for (int d = 0; d < R; ++d) poison(ranks[d]->recv.get(), ranks[d]->recv.bytes());
  for (int s = 0; s < R; ++s)
    for (int d = 0; d < R; ++d)
      loopback_dispatch(ranks[s]->L, h.count_matrix.data(), s, d, ranks[s]->send.get<uint8_t>(),
                        ranks[d]->recv.get<uint8_t>(), nullptr);
  std::vector<ep::host::ReceivedRoutes> routes(R);
  std::vector<ep::RecvPlan> recv_plans;
  for (int d = 0; d < R; ++d) {
    SimRank& k = *ranks[d];
    poison(k.out_num.get(), k.out_num.bytes());
    poison(k.out_x.get(), k.out_x.bytes());
    poison(k.out_x_scale.get(), k.out_x_scale.bytes());
    poison(k.out_src_token.get(), k.out_src_token.bytes());
    poison(k.out_per_rank.get(), k.out_per_rank.bytes());
    dispatch_recv(k.recv_params(), k.ws, sms, nullptr);
  }
  check_cuda(cudaDeviceSynchronize(), "dispatch_recv");
  for (int d = 0; d < R; ++d) {
    SimRank& k = *ranks[d];
    ASSERT_EQ(k.error().code, kErrNone) << "rank " << d << ": " << device_error_name(k.error().code);
    const int epr = k.L.experts_per_rank;
    std::vector<int32_t> expert_counts(size_t(R) * epr);
    for (int s = 0; s < R; ++s)
      for (int e = 0; e < epr; ++e)
        expert_counts[size_t(s) * epr + e] = h.plans[s].dest_expert_count[size_t(d) * epr + e];
    recv_plans.push_back(ep::make_recv_plan(k.L, h.count_matrix.data(), expert_counts.data()));
    const auto recv_bytes = download<uint8_t>(k.recv.get(), k.recv.bytes());
    std::vector<int32_t> hn(epr);
    std::vector<uint8_t> hx(k.out_x.bytes(), kPoison), hxs(k.out_x_scale.bytes(), kPoison);
    std::vector<uint8_t> hsrc(k.out_src_token.bytes(), kPoison), hper(k.out_per_rank.bytes(), kPoison);
    ep::host::unpack_dispatch(k.L, recv_plans[d], recv_bytes.data(), hn.data(), hx.data(),
                              k.L.num_scales ? reinterpret_cast<float*>(hxs.data()) : nullptr, routes[d],
                              k.scale_layout, reinterpret_cast<int32_t*>(hsrc.data()),
                              reinterpret_cast<int32_t*>(hper.data()));
    ASSERT_EQ(first_difference(download<uint8_t>(k.out_src_token.get(), k.out_src_token.bytes()), hsrc), -1)
        << "rank " << d << " source tokens differ from the host's unpack";
    ASSERT_EQ(first_difference(download<uint8_t>(k.out_per_rank.get(), k.out_per_rank.bytes()), hper), -1)
        << "rank " << d << " rows per source rank differ from the host's unpack";
    EXPECT_EQ(download<int32_t>(k.out_num.get(), epr), hn) << "rank " << d << " expert counts";
    ASSERT_EQ(first_difference(download<uint8_t>(k.out_x.get(), k.out_x.bytes()), hx), -1)
        << "rank " << d << " expert rows differ from the host's unpack";
    ASSERT_EQ(first_difference(download<uint8_t>(k.out_x_scale.get(), k.out_x_scale.bytes()), hxs), -1)
        << "rank " << d << " expert scales differ from the host's unpack";
    // And against the brute-force reference, independent of the wire format.
    ferry_a2a_config_t cd = base;
    cd.rank = d;
    const auto want_d = ep::reference::dispatch(cd, bounded, d);
    EXPECT_EQ(ep::reference::compare_dispatch(cd, want_d, hn.data(), hx.data(),
                                              k.L.num_scales ? reinterpret_cast<float*>(hxs.data()) : nullptr,
                                              k.scale_layout),
              "");
  }

  // --- combine send: partials identical to the host's (same rounding, same order).
  std::vector<std::vector<uint8_t>> ys(R);
  for (int d = 0; d < R; ++d) {
    SimRank& k = *ranks[d];
    // The standard expert model (y = dequant(x) * gain(e)) on the rows this rank received.
    ys[d].assign(k.rows() * k.L.out_row_bytes(), 0);
    ferry_a2a_config_t cd = base;
    cd.rank = d;
    const std::vector<float> scales = k.scale_rows(cd);
    ep::reference::apply_experts(k.L, download<int32_t>(k.out_num.get(), k.L.experts_per_rank).data(),
                                 download<uint8_t>(k.out_x.get(), k.out_x.bytes()).data(),
                                 k.L.num_scales ? scales.data() : nullptr, ys[d].data());
    upload(k.expert_y.get(), ys[d].data(), ys[d].size());
    poison(k.partials.get(), k.partials.bytes());
    combine_send(k.combine_send_params(), k.ws, sms, nullptr);
  }
  check_cuda(cudaDeviceSynchronize(), "combine_send");
  for (int d = 0; d < R; ++d) {
    SimRank& k = *ranks[d];
    const uint64_t used = uint64_t(recv_plans[d].total_records) * k.L.partial_bytes;
    std::vector<uint8_t> hp(k.partials.bytes(), kPoison);
    ep::host::pack_combine(k.L, routes[d], ys[d].data(), hp.data());
    auto dp = download<uint8_t>(k.partials.get(), k.partials.bytes());
    ASSERT_EQ(first_difference(dp, hp), -1) << "rank " << d << " partials differ from the host's (" << used
                                            << " bytes used)";
  }

  // --- loopback back, then combine recv, plain and accumulating.
  for (int s = 0; s < R; ++s) poison(ranks[s]->combine_recv.get(), ranks[s]->combine_recv.bytes());
  for (int s = 0; s < R; ++s)
    for (int d = 0; d < R; ++d)
      loopback_combine(ranks[s]->L, h.count_matrix.data(), s, d, ranks[d]->partials.get<uint8_t>(),
                       ranks[s]->combine_recv.get<uint8_t>(), nullptr);
  for (bool accumulate : {false, true}) {
    std::vector<std::vector<uint8_t>> before(R);
    for (int s = 0; s < R; ++s) {
      SimRank& k = *ranks[s];
      if (accumulate) {
        before[s] = random_expert_y(k.L, k.L.max_tokens, seed * 977 + s);
        upload(k.out_tokens.get(), before[s].data(), before[s].size());
      } else {
        poison(k.out_tokens.get(), k.out_tokens.bytes());
        before[s].assign(k.out_tokens.bytes(), kPoison);
      }
      combine_recv(k.combine_recv_params(accumulate), k.ws, sms, nullptr);
    }
    check_cuda(cudaDeviceSynchronize(), "combine_recv");
    for (int s = 0; s < R; ++s) {
      SimRank& k = *ranks[s];
      ASSERT_EQ(k.error().code, kErrNone) << "rank " << s << ": " << device_error_name(k.error().code);
      const auto crecv = download<uint8_t>(k.combine_recv.get(), k.combine_recv.bytes());
      std::vector<uint8_t> hout = before[s];
      if (k.L.weights_at_combine)
        ep::host::unpack_combine_rows(k.L, h.plans[s], crecv.data(), bounded[s].weights.data(), hout.data(),
                                      accumulate);
      else
        ep::host::unpack_combine(k.L, std::span<const ep::SendPlan>(&h.plans[s], 1), crecv.data(), hout.data(),
                                 accumulate);
      const auto dout = download<uint8_t>(k.out_tokens.get(), k.out_tokens.bytes());
      ASSERT_EQ(first_difference(dout, hout), -1)
          << "rank " << s << (accumulate ? " accumulated" : "") << " out_tokens differ from the host's combine";
      if (!accumulate) {
        // Against the fp32 reference: sum_k w * y[row], within out_dtype tolerance.
        ferry_a2a_config_t cs = base;
        cs.rank = s;
        const auto want = ep::reference::combine_standard(cs, bounded[s]);
        const auto magnitude = ep::reference::combine_magnitude_standard(cs, bounded[s]);
        EXPECT_EQ(ep::reference::compare_combine(cs, want, magnitude, dout.data(), bounded[s].num_tokens), "")
            << "rank " << s;
      }
    }
  }
}

std::vector<std::unique_ptr<SimRank>> make_ranks(const ferry_a2a_config_t& base,
                                                 int scale_layout = ep::kScaleRowMajor) {
  std::vector<std::unique_ptr<SimRank>> ranks;
  for (int r = 0; r < base.world_size; ++r) {
    ferry_a2a_config_t c = base;
    c.rank = r;
    ranks.push_back(std::make_unique<SimRank>(ep::make_layout(c), scale_layout));
  }
  return ranks;
}

TEST_P(KernelsVsHost, DispatchAndCombineMatchTheHostBackendByteForByte) {
  const Shape& shape = GetParam();
  const ferry_a2a_config_t base = config_of(shape, 0);
  auto ranks = make_ranks(base, shape.c.out_scale_layout);
  for (uint64_t seed : {11u, 12u}) {
    InputSpec spec = shape.c.spec;
    spec.seed = seed;
    const auto inputs = ep::reference::generate_all(base, spec);
    run_and_compare(ranks, base, inputs, seed);
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, KernelsVsHost,
    ::testing::Values(
        Shape{"fp8_h7168_scales_top8_overflow",
              {.world_size = 4, .num_experts = 32, .top_k = 8, .max_tokens = 64, .hidden = 7168,
               .in_dtype = FERRY_FP8_E4M3, .out_dtype = FERRY_BF16, .scale_block = 128, .expert_alignment = 8,
               .private_tokens = 16}},
        Shape{"bf16_h4096_ep8_zipf_drops",
              {.world_size = 8, .num_experts = 64, .top_k = 6, .max_tokens = 40, .hidden = 4096, .in_dtype = FERRY_BF16,
               .out_dtype = FERRY_F16, .private_tokens = 40,
               .spec = {.routing = Routing::zipf, .drop_fraction = 0.2, .vary_tokens = true}}},
        Shape{"f16_h5120_one_expert_f32_out",
              {.world_size = 2, .num_experts = 8, .top_k = 2, .max_tokens = 128, .hidden = 5120, .in_dtype = FERRY_F16,
               .out_dtype = FERRY_F32, .expert_alignment = 4, .private_tokens = 32,
               .spec = {.routing = Routing::one_expert}}},
        Shape{"f32_h2048_top8_of_12_varying",
              {.world_size = 3, .num_experts = 12, .top_k = 8, .max_tokens = 50, .hidden = 2048, .in_dtype = FERRY_F32,
               .out_dtype = FERRY_BF16, .private_tokens = 10, .spec = {.drop_fraction = 0.3, .vary_tokens = true}}},
        // Quantize on dispatch: the pack kernel's fused cast against the host's pack, byte for byte.
        Shape{"bf16_cast_fp8_h7168_top8_rounded_ue8m0",
              {.world_size = 4, .num_experts = 32, .top_k = 8, .max_tokens = 64, .hidden = 7168,
               .in_dtype = FERRY_FP8_E4M3, .out_dtype = FERRY_BF16, .scale_block = 128, .private_tokens = 16,
               .out_scale_layout = FERRY_SCALE_UE8M0_COLUMN_MAJOR,
               .spec = {.quantize = true, .round_scale = ep::reference::RoundScale::all}}},
        Shape{"bf16_cast_fp8_block32_column_major_drops_varying",
              {.world_size = 3, .num_experts = 12, .top_k = 4, .max_tokens = 40, .hidden = 2560,
               .in_dtype = FERRY_FP8_E4M3, .out_dtype = FERRY_BF16, .scale_block = 32, .expert_alignment = 4,
               .private_tokens = 8, .out_scale_layout = FERRY_SCALE_COLUMN_MAJOR,
               .spec = {.drop_fraction = 0.3, .zero_tokens_every = 3, .vary_tokens = true, .quantize = true,
                        .round_scale = ep::reference::RoundScale::odd_groups}}},
        Shape{"bf16_cast_fp8_block256_f32_out",
              {.world_size = 2, .num_experts = 4, .top_k = 2, .max_tokens = 33, .hidden = 1536,
               .in_dtype = FERRY_FP8_E4M3, .out_dtype = FERRY_F32, .scale_block = 256,
               .spec = {.quantize = true}}},
        // Weights at combine: rows travel back unweighted, the source weighs them (DeepEP's combine).
        Shape{"weights_at_combine_bf16_top8_of_32",
              {.world_size = 4, .num_experts = 32, .top_k = 8, .max_tokens = 48, .hidden = 4096,
               .in_dtype = FERRY_BF16, .out_dtype = FERRY_BF16, .private_tokens = 12,
               .combine_weights = FERRY_WEIGHTS_AT_COMBINE, .spec = {.drop_fraction = 0.2, .vary_tokens = true}}},
        Shape{"weights_at_combine_bf16_cast_fp8_ue8m0_f32_out",
              {.world_size = 3, .num_experts = 12, .top_k = 6, .max_tokens = 40, .hidden = 2048,
               .in_dtype = FERRY_FP8_E4M3, .out_dtype = FERRY_F32, .scale_block = 128, .expert_alignment = 2,
               .out_scale_layout = FERRY_SCALE_UE8M0_COLUMN_MAJOR, .combine_weights = FERRY_WEIGHTS_AT_COMBINE,
               .spec = {.zero_tokens_every = 3, .quantize = true, .round_scale = ep::reference::RoundScale::all}}},
        Shape{"bf16_cast_fp8_block8_rounded",
              {.world_size = 2, .num_experts = 4, .top_k = 2, .max_tokens = 33, .hidden = 512,
               .in_dtype = FERRY_FP8_E4M3, .out_dtype = FERRY_BF16, .scale_block = 8,
               .spec = {.quantize = true, .round_scale = ep::reference::RoundScale::all}}}),
    [](const ::testing::TestParamInfo<Shape>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ferry::cuda

namespace ferry::cuda {
namespace {

class KernelErrors : public ::testing::Test {
 protected:
  void SetUp() override { FERRY_REQUIRE_GPU(); }
};

ferry_a2a_config_t small_config() {
  return config_of(Shape{"small",
                         {.world_size = 4, .num_experts = 16, .top_k = 4, .max_tokens = 32, .hidden = 2048,
                          .in_dtype = FERRY_BF16, .out_dtype = FERRY_BF16, .private_tokens = 8}},
                   0);
}

TEST_F(KernelErrors, InvalidExpertIdIsReportedAndPoisonsEveryCountHeader) {
  const auto base = small_config();
  auto ranks = make_ranks(base);
  SimRank& k = *ranks[0];
  auto inputs = ep::reference::generate_all(base, InputSpec{});
  inputs[0].indices[3 * base.experts_per_token + 1] = base.num_experts;  // one past the last expert
  k.set_input(inputs[0], inputs[0].num_tokens);
  poison(k.send.get(), k.send.bytes());
  dispatch_send(k.send_params(), k.ws, num_sms(), nullptr);
  check_cuda(cudaDeviceSynchronize(), "dispatch_send");
  const DeviceError e = k.error();
  EXPECT_EQ(e.code, kErrInvalidExpert);
  EXPECT_EQ(e.a, 3);
  EXPECT_EQ(e.b, 1);
  EXPECT_EQ(e.c, base.num_experts);
  // Peers must learn at once that this rank's step failed.
  const auto send = download<uint8_t>(k.send.get(), k.send.bytes());
  for (int d = 0; d < base.world_size; ++d) {
    int32_t first;
    std::memcpy(&first, send.data() + k.L.send_section_offset(d, k.ws.host_dest_count[0] * 0 + [&] {
      int64_t before = 0;
      for (int j = 0; j < d; ++j) before += k.ws.host_dest_count[j];
      return before;
    }()), 4);
    EXPECT_EQ(first, ep::kPoisonCount) << "header for rank " << d;
  }
}

TEST_F(KernelErrors, RepeatedExpertAndOversizedBoundAreReported) {
  const auto base = small_config();
  auto ranks = make_ranks(base);
  SimRank& k = *ranks[0];
  auto inputs = ep::reference::generate_all(base, InputSpec{});
  inputs[0].indices[5 * base.experts_per_token + 2] = inputs[0].indices[5 * base.experts_per_token + 0];
  k.set_input(inputs[0], inputs[0].num_tokens);
  dispatch_send(k.send_params(), k.ws, num_sms(), nullptr);
  check_cuda(cudaDeviceSynchronize(), "dispatch_send");
  EXPECT_EQ(k.error().code, kErrRepeatedExpert);
  EXPECT_EQ(k.error().a, 5);

  k.clear_error();
  const int too_many = k.L.max_tokens + 1;
  upload(k.bound_m.get(), &too_many, 4);
  dispatch_send(k.send_params(), k.ws, num_sms(), nullptr);
  check_cuda(cudaDeviceSynchronize(), "dispatch_send");
  EXPECT_EQ(k.error().code, kErrBoundTooLarge);
  EXPECT_EQ(k.error().a, too_many);
}

// A peer is never trusted to index our memory: an announced count past max_tokens and a record
// naming a local expert that does not exist are reported, and nothing is written out of place
// (compute-sanitizer memcheck runs this on the GPU machine).
TEST_F(KernelErrors, LyingPeerIsReportedWithoutWritingOutOfBounds) {
  const auto base = small_config();
  auto ranks = make_ranks(base);
  SimRank& k = *ranks[1];
  poison(k.recv.get(), k.recv.bytes());
  std::vector<uint8_t> header(k.L.count_header_bytes, 0);
  for (int s = 0; s < base.world_size; ++s) {
    auto* counts = reinterpret_cast<int32_t*>(header.data());
    counts[0] = 0;
    counts[1] = s == 2 ? k.L.max_tokens + 1000 : 0;
    upload(k.recv.get<uint8_t>() + k.L.recv_private_offset(s), header.data(), header.size());
  }
  dispatch_recv(k.recv_params(), k.ws, num_sms(), nullptr);
  check_cuda(cudaDeviceSynchronize(), "dispatch_recv");
  EXPECT_EQ(k.error().code, kErrPeerCount);
  EXPECT_EQ(k.error().a, 2);

  // One record from rank 3 whose header names local expert 99.
  k.clear_error();
  reinterpret_cast<int32_t*>(header.data())[1] = 0;
  upload(k.recv.get<uint8_t>() + k.L.recv_private_offset(2), header.data(), header.size());
  reinterpret_cast<int32_t*>(header.data())[1] = 1;
  upload(k.recv.get<uint8_t>() + k.L.recv_private_offset(3), header.data(), header.size());
  ep::RecordHeader rh{};
  rh.src_token = 0;
  rh.src_rank = 3;
  rh.num_routes = 1;
  rh.local_expert[0] = 99;
  upload(k.recv.get<uint8_t>() + k.L.recv_record_offset(3, 0, 0), &rh, sizeof rh);
  dispatch_recv(k.recv_params(), k.ws, num_sms(), nullptr);
  check_cuda(cudaDeviceSynchronize(), "dispatch_recv");
  EXPECT_EQ(k.error().code, kErrPeerRecord);
  EXPECT_EQ(k.error().a, 3);
  EXPECT_EQ(k.error().c, kRecordExpert);
  EXPECT_EQ(download<int32_t>(k.out_num.get(), k.L.experts_per_rank), std::vector<int32_t>(k.L.experts_per_rank, 0));
}

// The device-side state makes each half capturable: capture every rank's halves once, then replay
// them 100 times with fresh inputs and a fresh device-side token count each time; every replay must
// equal the host backend's result for those inputs.
TEST_F(KernelErrors, GraphReplayOfEveryHalfMatchesTheHostOnFreshInputs) {
  const auto base = small_config();
  auto ranks = make_ranks(base);
  const int R = base.world_size, sms = num_sms();
  Stream stream(/*blocking=*/true);
  std::vector<cudaGraphExec_t> send_g(R), recv_g(R), csend_g(R), comb_g(R);
  auto capture = [&](auto&& body) {
    cudaGraph_t g;
    check_cuda(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeThreadLocal), "begin capture");
    body();
    check_cuda(cudaStreamEndCapture(stream.get(), &g), "end capture");
    cudaGraphExec_t exec;
    check_cuda(cudaGraphInstantiate(&exec, g, 0), "instantiate");
    cudaGraphDestroy(g);
    return exec;
  };
  for (int r = 0; r < R; ++r) {
    SimRank& k = *ranks[r];
    // Parameters are captured once: the token count comes from bound_m on the device.
    k.in.num_tokens = k.L.max_tokens;
    send_g[r] = capture([&] { dispatch_send(k.send_params(), k.ws, sms, stream.get()); });
    recv_g[r] = capture([&] { dispatch_recv(k.recv_params(), k.ws, sms, stream.get()); });
    csend_g[r] = capture([&] { combine_send(k.combine_send_params(), k.ws, sms, stream.get()); });
    comb_g[r] = capture([&] { combine_recv(k.combine_recv_params(false), k.ws, sms, stream.get()); });
  }
  for (int replay = 0; replay < 100; ++replay) {
    InputSpec spec;
    spec.seed = 1000 + replay;
    spec.vary_tokens = true;
    spec.drop_fraction = replay % 3 == 0 ? 0.25 : 0.0;
    const auto inputs = ep::reference::generate_all(base, spec);
    std::vector<ep::SendPlan> plans;
    std::vector<int32_t> cm(size_t(R) * R);
    std::vector<std::vector<uint8_t>> ys(R);
    for (int r = 0; r < R; ++r) {
      SimRank& k = *ranks[r];
      RankInput padded = inputs[r];
      padded.x.resize(uint64_t(k.L.max_tokens) * k.L.payload_bytes, 0x5A);
      padded.indices.resize(uint64_t(k.L.max_tokens) * k.L.top_k, 1 << 30);
      padded.weights.resize(uint64_t(k.L.max_tokens) * k.L.top_k, 1.f);
      const int n = inputs[r].num_tokens;
      k.set_input(padded, n);
      k.in.num_tokens = k.L.max_tokens;
      plans.push_back(ep::make_send_plan(k.L, inputs[r].indices.data(), n, 0));
      for (int d = 0; d < R; ++d) cm[size_t(r) * R + d] = plans[r].dest_count[d];
      poison(k.out_x.get(), k.out_x.bytes());
      poison(k.out_tokens.get(), k.out_tokens.bytes());
      check_cuda(cudaGraphLaunch(send_g[r], stream.get()), "launch send graph");
    }
    for (int s = 0; s < R; ++s)
      for (int d = 0; d < R; ++d)
        loopback_dispatch(ranks[s]->L, cm.data(), s, d, ranks[s]->send.get<uint8_t>(), ranks[d]->recv.get<uint8_t>(),
                          stream.get());
    for (int r = 0; r < R; ++r) check_cuda(cudaGraphLaunch(recv_g[r], stream.get()), "launch recv graph");
    check_cuda(cudaStreamSynchronize(stream.get()), "dispatch replay");
    for (int r = 0; r < R; ++r) {  // the experts, on the host: y = dequant(x) * gain(e)
      SimRank& k = *ranks[r];
      ys[r].assign(k.rows() * k.L.out_row_bytes(), 0);
      ep::reference::apply_experts(k.L, download<int32_t>(k.out_num.get(), k.L.experts_per_rank).data(),
                                   download<uint8_t>(k.out_x.get(), k.out_x.bytes()).data(), nullptr, ys[r].data());
      upload(k.expert_y.get(), ys[r].data(), ys[r].size());
      check_cuda(cudaGraphLaunch(csend_g[r], stream.get()), "launch combine send graph");
    }
    for (int s = 0; s < R; ++s)
      for (int d = 0; d < R; ++d)
        loopback_combine(ranks[s]->L, cm.data(), s, d, ranks[d]->partials.get<uint8_t>(),
                         ranks[s]->combine_recv.get<uint8_t>(), stream.get());
    for (int r = 0; r < R; ++r) check_cuda(cudaGraphLaunch(comb_g[r], stream.get()), "launch combine graph");
    check_cuda(cudaStreamSynchronize(stream.get()), "replay");
    for (int r = 0; r < R; ++r) {
      SimRank& k = *ranks[r];
      ASSERT_EQ(k.error().code, kErrNone) << "replay " << replay << " rank " << r;
      ferry_a2a_config_t cr = base;
      cr.rank = r;
      const auto want = ep::reference::dispatch(cr, inputs, r);
      const auto n = download<int32_t>(k.out_num.get(), k.L.experts_per_rank);
      const auto x = download<uint8_t>(k.out_x.get(), k.out_x.bytes());
      ASSERT_EQ(ep::reference::compare_dispatch(cr, want, n.data(), x.data(), nullptr), "") << "replay " << replay;
      const auto out = download<uint8_t>(k.out_tokens.get(), k.out_tokens.bytes());
      ASSERT_EQ(ep::reference::compare_combine(cr, ep::reference::combine_standard(cr, inputs[r]),
                                               ep::reference::combine_magnitude_standard(cr, inputs[r]), out.data(),
                                               inputs[r].num_tokens),
                "")
          << "replay " << replay << " rank " << r;
    }
  }
  for (int r = 0; r < R; ++r) {
    cudaGraphExecDestroy(send_g[r]);
    cudaGraphExecDestroy(recv_g[r]);
    cudaGraphExecDestroy(csend_g[r]);
    cudaGraphExecDestroy(comb_g[r]);
  }
}

}  // namespace
}  // namespace ferry::cuda
