// ferry-cuda-bench: GPU time of each half of the CUDA all-to-all for one rank of an EP layout, the
// network left out (the other ranks' records are produced by the same kernels and placed with
// loopback copies). Times are CUDA-event medians of graph replays of back-to-back calls, so launch
// gaps are amortised as in a captured serving step. Pack and unpack are also reported as achieved
// bytes/s (bytes read + written) against a device-to-device copy measured in the same run.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
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

namespace ferry::cuda {
namespace {

struct Options {
  int world_size = 64;
  int num_experts = 256;
  int top_k = 8;
  int hidden = 7168;
  int scale_block = 128;
  std::vector<std::string> presets{"decode", "prefill"};
  int replays = 20;
};

// Median time of one call, from `replays` timed launches of a graph holding `calls` back-to-back calls.
template <class Fn>
double time_us(cudaStream_t stream, int calls, int replays, Fn&& body) {
  cudaGraph_t g;
  check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
  for (int i = 0; i < calls; ++i) body();
  check_cuda(cudaStreamEndCapture(stream, &g), "end capture");
  cudaGraphExec_t exec;
  check_cuda(cudaGraphInstantiate(&exec, g, 0), "instantiate");
  cudaGraphDestroy(g);
  Event a, b;
  std::vector<double> us;
  for (int r = 0; r < replays + 2; ++r) {
    check_cuda(cudaEventRecord(a.get(), stream), "record");
    check_cuda(cudaGraphLaunch(exec, stream), "graph launch");
    check_cuda(cudaEventRecord(b.get(), stream), "record");
    check_cuda(cudaEventSynchronize(b.get()), "sync");
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, a.get(), b.get()), "elapsed");
    if (r >= 2) us.push_back(1000.0 * ms / calls);  // the first two warm up
  }
  cudaGraphExecDestroy(exec);
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

double copy_bandwidth_gbs(cudaStream_t stream) {
  const size_t bytes = size_t(1) << 30;
  DeviceBuffer a(bytes), b(bytes);
  check_cuda(cudaMemset(a.get(), 1, bytes), "memset");
  const double us = time_us(stream, 4, 10, [&] {
    check_cuda(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice, stream), "copy");
  });
  return 2.0 * bytes / (us * 1e-6) / 1e9;
}

struct Input {
  std::vector<uint8_t> x;
  std::vector<float> scales, weights;
  std::vector<int32_t> indices;
};

Input random_input(const ep::Layout& L, int num_tokens, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Input in;
  in.x.resize(uint64_t(num_tokens) * L.payload_bytes);
  for (auto& b : in.x) b = uint8_t(rng() & 0x77);  // finite fp8 values
  in.scales.resize(uint64_t(num_tokens) * L.num_scales);
  for (auto& s : in.scales) s = 0.5f + float(rng() % 1000) / 1000.f;
  in.indices.resize(uint64_t(num_tokens) * L.top_k);
  in.weights.resize(in.indices.size());
  std::vector<int> experts(L.num_experts);
  for (int t = 0; t < num_tokens; ++t) {
    for (int e = 0; e < L.num_experts; ++e) experts[e] = e;
    for (int k = 0; k < L.top_k; ++k) {  // distinct experts, uniformly
      std::swap(experts[k], experts[k + rng() % (L.num_experts - k)]);
      in.indices[size_t(t) * L.top_k + k] = experts[k];
      in.weights[size_t(t) * L.top_k + k] = float(rng() % 1000) / 1000.f;
    }
  }
  return in;
}

// Device copies of one rank's inputs and state.
struct Rank {
  ep::Layout L;
  DeviceBuffer x, scales, indices, weights, send, ws_dev;
  MappedHostBuffer ws_host;
  Workspace ws{};
  Rank(const ep::Layout& layout, const Input& in)
      : L(layout), x(in.x.size()), scales(in.scales.size() * 4), indices(in.indices.size() * 4),
        weights(in.weights.size() * 4), send(L.send_buffer_bytes()), ws_dev(workspace_device_bytes(L)),
        ws_host(workspace_host_bytes(L)) {
    check_cuda(cudaMemcpy(x.get(), in.x.data(), in.x.size(), cudaMemcpyHostToDevice), "upload");
    check_cuda(cudaMemcpy(scales.get(), in.scales.data(), in.scales.size() * 4, cudaMemcpyHostToDevice), "upload");
    check_cuda(cudaMemcpy(indices.get(), in.indices.data(), in.indices.size() * 4, cudaMemcpyHostToDevice), "upload");
    check_cuda(cudaMemcpy(weights.get(), in.weights.data(), in.weights.size() * 4, cudaMemcpyHostToDevice), "upload");
    check_cuda(cudaMemset(ws_dev.get(), 0, ws_dev.bytes()), "memset");
    std::memset(ws_host.host(), 0, ws_host.bytes());
    ws = carve_workspace(L, ws_dev.get(), ws_host.dev());
  }
  DispatchSendParams send_params(int num_tokens) const {
    return {L, x.get(), scales.get<float>(), indices.get<int32_t>(), weights.get<float>(), nullptr, num_tokens,
            send.get<uint8_t>()};
  }
};

ferry_a2a_config_t config_for(const Options& o, int max_tokens, int rank) {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.rank = rank;
  c.world_size = o.world_size;
  c.num_experts = o.num_experts;
  c.experts_per_token = o.top_k;
  c.max_tokens_per_rank = max_tokens;
  c.hidden_dim = o.hidden;
  c.in_dtype = FERRY_FP8_E4M3;
  c.scale_block = o.scale_block;
  c.out_dtype = FERRY_BF16;
  c.device = FERRY_DEVICE_CUDA;
  return c;
}

void run_preset(const Options& o, const std::string& preset, double copy_gbs, int sms, cudaStream_t stream) {
  const int T = preset == "decode" ? 128 : 4096;
  const int R = o.world_size;
  const ep::Layout L0 = ep::make_layout(config_for(o, T, 0));
  prepare_kernels(L0);
  const int calls = preset == "decode" ? 50 : 5;

  // Rank 0's receive buffer, filled by every sender's real pack (sender by sender, one send buffer).
  DeviceBuffer recv(L0.recv_buffer_bytes());
  std::vector<int32_t> cm(size_t(R) * R, 0);
  {
    const ep::Layout Ls0 = ep::make_layout(config_for(o, T, 0));
    Rank sender(Ls0, random_input(Ls0, T, 1));
    for (int s = 0; s < R; ++s) {
      const ep::Layout Ls = ep::make_layout(config_for(o, T, s));
      const Input in = random_input(Ls, T, 100 + s);
      check_cuda(cudaMemcpy(sender.indices.get(), in.indices.data(), in.indices.size() * 4, cudaMemcpyHostToDevice), "u");
      check_cuda(cudaMemcpy(sender.x.get(), in.x.data(), in.x.size(), cudaMemcpyHostToDevice), "u");
      auto p = sender.send_params(T);
      p.layout = Ls;
      dispatch_send(p, sender.ws, sms, stream);
      check_cuda(cudaStreamSynchronize(stream), "sender pack");
      for (int d = 0; d < R; ++d) cm[size_t(s) * R + d] = sender.ws.host_dest_count[d];
      loopback_dispatch(Ls, cm.data(), s, 0, sender.send.get<uint8_t>(), recv.get<uint8_t>(), stream);
      check_cuda(cudaStreamSynchronize(stream), "loopback");
    }
  }

  Rank me(L0, random_input(L0, T, 7));
  const uint64_t rows = uint64_t(L0.experts_per_rank) * L0.max_rows_per_expert;
  DeviceBuffer out_num(L0.experts_per_rank * 4), out_x(rows * L0.payload_bytes), out_s(rows * L0.num_scales * 4);
  DeviceBuffer y(rows * L0.out_row_bytes()), partials(L0.combine_send_bytes()), crecv(L0.combine_recv_bytes());
  DeviceBuffer out_tokens(uint64_t(T) * L0.out_row_bytes());
  check_cuda(cudaMemset(y.get(), 0x3c, y.bytes()), "y");           // bf16 ~1.0x, finite
  check_cuda(cudaMemset(crecv.get(), 0x3c, crecv.bytes()), "partials");
  const DispatchRecvParams rp{L0, recv.get<uint8_t>(), nullptr, kDefaultWaitTimeoutNs, out_num.get<int32_t>(),
                              out_x.get(), out_s.get<float>()};
  const CombineSendParams csp{L0, y.get(), partials.get<uint8_t>()};
  const CombineRecvParams crp{L0, crecv.get<uint8_t>(), nullptr, kDefaultWaitTimeoutNs, out_tokens.get(), false};

  const double send_us = time_us(stream, calls, o.replays, [&] { dispatch_send(me.send_params(T), me.ws, sms, stream); });
  // The same pack with quantize on dispatch: bf16 tokens in, cast to fp8 and block scales on the way
  // (the same routing, so the same records); once with the scales rounded to powers of two.
  DeviceBuffer x_bf16(uint64_t(T) * o.hidden * 2);
  {
    std::mt19937_64 rng(5);
    std::vector<uint16_t> h(uint64_t(T) * o.hidden);
    for (auto& v : h) v = ep::dtype::f32_to_bf16(std::ldexp(float(rng() % 2000) / 1000.f - 1.f, int(rng() % 16) - 8));
    check_cuda(cudaMemcpy(x_bf16.get(), h.data(), h.size() * 2, cudaMemcpyHostToDevice), "upload bf16");
  }
  auto cast_params = [&](bool round_scale) {
    DispatchSendParams p = me.send_params(T);
    p.x = x_bf16.get();
    p.x_scale = nullptr;
    p.quantize = true;
    p.round_scale = round_scale;
    return p;
  };
  const double cast_us = time_us(stream, calls, o.replays, [&] { dispatch_send(cast_params(false), me.ws, sms, stream); });
  const double cast_round_us =
      time_us(stream, calls, o.replays, [&] { dispatch_send(cast_params(true), me.ws, sms, stream); });
  const double recv_us = time_us(stream, calls, o.replays, [&] { dispatch_recv(rp, me.ws, sms, stream); });
  const double csend_us = time_us(stream, calls, o.replays, [&] { combine_send(csp, me.ws, sms, stream); });
  const double crecv_us = time_us(stream, calls, o.replays, [&] { combine_recv(crp, me.ws, sms, stream); });
  check_cuda(cudaStreamSynchronize(stream), "bench");
  const DeviceError err = *me.ws_host.host<DeviceError>();
  if (err.code != kErrNone) raise(Status::internal, std::string("bench kernels reported: ") + device_error_name(err.code));

  // Bytes each half must move at least: pack reads each token once and writes each record once;
  // unpack reads each record once and writes one row per route; combine halves likewise.
  int32_t sent = 0, received = 0;
  for (int d = 0; d < R; ++d) sent += me.ws.host_dest_count[d];
  check_cuda(cudaMemcpy(&received, me.ws.num_recv, 4, cudaMemcpyDeviceToHost), "num_recv");
  std::vector<int32_t> per_expert(L0.experts_per_rank);
  check_cuda(cudaMemcpy(per_expert.data(), out_num.get(), per_expert.size() * 4, cudaMemcpyDeviceToHost), "counts");
  int64_t routes = 0;
  for (int v : per_expert) routes += v;
  const double row = double(L0.payload_bytes + L0.scale_bytes);
  const double pack_bytes = T * row + sent * double(L0.record_bytes) + R * double(L0.count_header_bytes);
  const double cast_pack_bytes = T * 2.0 * o.hidden + sent * double(L0.record_bytes) + R * double(L0.count_header_bytes);
  const double unpack_bytes = received * double(L0.record_bytes) + routes * row;
  const double csend_bytes = routes * double(L0.out_row_bytes()) + received * double(L0.partial_bytes);
  const double crecv_bytes = sent * double(L0.partial_bytes) + T * double(L0.out_row_bytes());
  auto gbs = [](double bytes, double us) { return bytes / (us * 1e-6) / 1e9; };
  std::printf("\n%s: EP%d, %d tokens/rank, hidden %d fp8 + 1/%d fp32 scales, top-%d of %d experts, bf16 out\n",
              preset.c_str(), R, T, o.hidden, o.scale_block, o.top_k, o.num_experts);
  std::printf("  records sent %d, records received %d, expert rows %lld\n", sent, received, (long long)routes);
  std::printf("  %-22s %10s %12s %10s\n", "half", "GPU us", "GB/s", "% of copy");
  auto line = [&](const char* name, double us, double bytes) {
    std::printf("  %-22s %10.2f %12.1f %9.1f%%\n", name, us, gbs(bytes, us), 100.0 * gbs(bytes, us) / copy_gbs);
  };
  line("dispatch send (pack)", send_us, pack_bytes);
  line("  + bf16 cast in pack", cast_us, cast_pack_bytes);
  line("  + cast, pow2 scales", cast_round_us, cast_pack_bytes);
  line("dispatch recv (unpack)", recv_us, unpack_bytes);
  line("combine send", csend_us, csend_bytes);
  line("combine recv", crecv_us, crecv_bytes);
  std::printf("  the cast costs %.2f us per dispatch send (%.2f with power-of-two scales)\n", cast_us - send_us,
              cast_round_us - send_us);
}

}  // namespace
}  // namespace ferry::cuda

int main(int argc, char** argv) {
  using namespace ferry::cuda;
  Options o;
  CLI::App app{"ferry-cuda-bench: GPU time of the CUDA all-to-all halves for one rank (no network)"};
  app.add_option("--world-size", o.world_size, "EP ranks of the layout");
  app.add_option("--experts", o.num_experts, "global experts");
  app.add_option("--top-k", o.top_k, "experts per token");
  app.add_option("--hidden", o.hidden, "hidden size (fp8 elements)");
  app.add_option("--scale-block", o.scale_block, "elements per fp32 scale");
  app.add_option("--preset", o.presets, "decode (128 tokens) and/or prefill (4096 tokens)");
  app.add_option("--replays", o.replays, "timed graph replays per half (median reported)");
  CLI11_PARSE(app, argc, argv);
  try {
    int dev = 0, sms = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "sm count");
    cudaDeviceProp prop{};
    check_cuda(cudaGetDeviceProperties(&prop, dev), "properties");
    Stream stream(/*blocking=*/true);
    const double copy = copy_bandwidth_gbs(stream.get());
    std::printf("device: %s, %d SMs; cudaMemcpy D2D (1 GiB, read + written): %.1f GB/s\n", prop.name, sms, copy);
    for (const auto& p : o.presets) run_preset(o, p, copy, sms, stream.get());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry-cuda-bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
