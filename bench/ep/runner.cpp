#include "bench/ep/runner.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "bench/ep/gemm.h"
#include "bench/ep/mpi_baseline.h"
#include "bench/ep/results.h"
#include "bench/ep/routing.h"
#include "bench/ep/tbo.h"
#include "bench/moe_layer/memory.h"
#include "csrc/backend.h"
#include "csrc/host/work_pool.h"
#include "csrc/reference.h"
#include "tools/common/bootstrap.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

#if defined(FERRY_HAVE_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace ferry::bench {

namespace {

using Clock = std::chrono::steady_clock;

double since_us(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

#if defined(FERRY_HAVE_CUDA)
void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) raise(Status::internal, std::string(what) + ": " + cudaGetErrorString(e));
}
#endif

// Buffers the a2a reads or writes (host memory for the host backend, device memory for CUDA) and
// the CUDA stream: the MoE layer's (bench/moe_layer/memory.h).
using Buffer = moe::Memory;
using moe::Stream;

struct A2a {
  ferry_a2a_t handle = nullptr;
  ~A2a() {
    if (handle) ferry_a2a_destroy(handle);
  }
};

// Timed samples of one operation on this rank, plus bytes sent per call when measured.
struct Samples {
  std::vector<double> us;
  double bytes_sum = 0;
  int bytes_calls = 0;
  void add(double v) { us.push_back(v); }
  void add_bytes(uint64_t b) {
    bytes_sum += double(b);
    ++bytes_calls;
  }
};

class Progress {
 public:
  Progress(bool enabled) : enabled_(enabled), tty_(isatty(STDERR_FILENO)) {}
  void phase(const std::string& name, int total) {
    if (!enabled_) return;
    name_ = name;
    total_ = total;
    if (!tty_) std::fprintf(stderr, "ferry-bench: %s (%d iterations)\n", name.c_str(), total);
  }
  void step(int done) {
    if (!enabled_ || !tty_) return;
    const auto now = Clock::now();
    if (done < total_ && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    std::fprintf(stderr, "\rferry-bench: %s %d/%d", name_.c_str(), done, total_);
    if (done == total_) std::fprintf(stderr, "\r\033[K");
    std::fflush(stderr);
  }

 private:
  bool enabled_, tty_;
  std::string name_;
  int total_ = 0;
  Clock::time_point last_{};
};

OpResult summarize(te::Bootstrap& boot, const std::string& name, const Samples& s, int timeout_ms) {
  OpResult r;
  r.name = name;
  std::vector<int> counts;
  const auto all = tools::allgather_values(boot, s.us, timeout_ms, &counts);
  r.latency_us = tools::percentiles(all);
  if (!counts.empty() && std::all_of(counts.begin(), counts.end(), [&](int c) { return c == counts[0]; })) {
    const size_t n = size_t(counts[0]);
    std::vector<double> step(n, 0.0);
    for (size_t rank = 0; rank < counts.size(); ++rank) {
      for (size_t i = 0; i < n; ++i) step[i] = std::max(step[i], all[rank * n + i]);
    }
    r.step_us = tools::percentiles(step);
  }
  const double my_p50 = tools::percentiles(s.us).p50;
  const double my_bytes = s.bytes_calls ? s.bytes_sum / s.bytes_calls : 0.0;
  const double mine[2] = {my_p50, my_bytes};
  const auto per_rank = tools::allgather_values(boot, mine, timeout_ms);
  double gbps_sum = 0, gbps_min = 0, bytes_sum = 0;
  for (int rank = 0; rank < boot.world_size(); ++rank) {
    const double p50 = per_rank[2 * rank], bytes = per_rank[2 * rank + 1];
    r.rank_p50_us.push_back(p50);
    r.rank_bytes.push_back(bytes);
    bytes_sum += bytes;
    const double gbps = p50 > 0 ? bytes / (p50 * 1e3) : 0;  // bytes/us = MB/s; /1e3 -> GB/s
    gbps_sum += gbps;
    gbps_min = rank == 0 ? gbps : std::min(gbps_min, gbps);
  }
  r.bytes_per_rank = bytes_sum / boot.world_size();
  r.gbps_per_rank_mean = gbps_sum / boot.world_size();
  r.gbps_per_rank_min = gbps_min;
  return r;
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

}  // namespace

int run_rank(const Options& o, const char* launcher_label, const tools::NodeEmulation& nodes) {
  const auto wall0 = Clock::now();
  const tools::RankEnv env = tools::discover_rank_env();
  MpiSession mpi(env.under_mpi());
  auto boot = tools::make_bootstrap(env, o.timeout_ms);
  const int rank = boot->rank(), world = boot->world_size();
  const int timeout_ms = o.timeout_ms;
  if (auto msg = check_world_size(o, world); !msg.empty()) {
    if (rank == 0) std::fprintf(stderr, "ferry-bench: error: %s\n", msg.c_str());
    return 2;
  }
  tools::CBootstrap cboot(*boot);
  const bool device = o.backend == FERRY_DEVICE_CUDA;

  ferry_a2a_config_t config = make_a2a_config(o, rank, world);
#if defined(FERRY_HAVE_CUDA)
  if (device) {
    int num_gpus = 0;
    check_cuda(cudaGetDeviceCount(&num_gpus), "cudaGetDeviceCount");
    config.cuda_device = (env.local_rank >= 0 ? env.local_rank : rank) % num_gpus;
    check_cuda(cudaSetDevice(config.cuda_device), "cudaSetDevice");
  }
#endif
  A2a a2a;
  tools::check(ferry_a2a_create(&config, cboot.get(), &a2a.handle), "ferry_a2a_create");
  ferry_buffer_sizes_t sizes{};
  tools::check(ferry_a2a_buffer_bytes(a2a.handle, &sizes), "ferry_a2a_buffer_bytes");
  const ep::Layout layout = ep::make_layout(config);

  // Buffers of the pplx-kernels contract.
  const int num_local = sizes.num_local_experts;
  const size_t rows = size_t(num_local) * sizes.max_rows_per_expert;
  const size_t in_elem = ep::elem_bytes_of(o.in_dtype), out_elem = ep::elem_bytes_of(o.out_dtype);
  const size_t num_scales = o.scale_block > 0 ? size_t(o.hidden / o.scale_block) : 0;
  Stream stream(device);
  Buffer expert_num_tokens(sizeof(int32_t) * num_local, device);
  Buffer expert_x(rows * o.hidden * in_elem, device);
  Buffer expert_x_scale(rows * num_scales * sizeof(float), device);
  Buffer expert_y(rows * o.hidden * out_elem, device);
  Buffer x(size_t(o.tokens) * o.hidden * in_elem, device);
  Buffer x_scale(size_t(o.tokens) * num_scales * sizeof(float), device);
  Buffer indices(size_t(o.tokens) * o.topk * sizeof(int32_t), device);
  Buffer weights(size_t(o.tokens) * o.topk * sizeof(float), device);
  Buffer out_tokens(size_t(o.tokens) * o.hidden * out_elem, device);

  // Inputs: the reference generator's tokens (any rank can regenerate any rank's), routing either
  // fixed from a file or fresh every timed iteration.
  ep::reference::InputSpec spec;
  spec.seed = o.seed;
  spec.routing = o.routing == RoutingMode::zipf ? ep::reference::Routing::zipf : ep::reference::Routing::uniform;
  spec.zipf_s = o.zipf_s;
  std::optional<RoutingTable> file_routing;
  if (o.routing == RoutingMode::file) {
    file_routing = read_routing_file(o.routing_file, world, o.topk, o.experts, o.tokens);
  }
  auto apply_file_routing = [&](ep::reference::RankInput& in, int r) {
    const int n = file_routing->num_tokens(r);
    in.num_tokens = std::min(in.num_tokens, n);
    in.indices.assign(file_routing->indices[r].begin(), file_routing->indices[r].begin() + size_t(in.num_tokens) * o.topk);
    in.weights.resize(size_t(in.num_tokens) * o.topk);
  };
  std::vector<ep::reference::RankInput> all_inputs;
  ep::reference::RankInput mine;
  if (o.verify) {
    all_inputs = ep::reference::generate_all(config, spec);
    if (file_routing) for (int r = 0; r < world; ++r) apply_file_routing(all_inputs[r], r);
    mine = all_inputs[rank];
  } else {
    mine = ep::reference::generate_input(config, spec, rank);
    if (file_routing) apply_file_routing(mine, rank);
  }
  const int num_tokens = mine.num_tokens;
  x.upload(mine.x.data(), mine.x.size());
  x_scale.upload(mine.x_scale.data(), mine.x_scale.size() * sizeof(float));

  ferry_dispatch_args_t dargs{};
  dargs.out_expert_num_tokens = static_cast<int32_t*>(expert_num_tokens.get());
  dargs.out_expert_x = expert_x.get();
  dargs.out_expert_x_scale = num_scales ? static_cast<float*>(expert_x_scale.get()) : nullptr;
  dargs.dp_x = x.get();
  dargs.dp_x_scale = num_scales ? static_cast<const float*>(x_scale.get()) : nullptr;
  dargs.indices = static_cast<const int32_t*>(indices.get());
  dargs.weights = static_cast<const float*>(weights.get());
  dargs.bound_m = nullptr;
  dargs.num_tokens = num_tokens;
  ferry_combine_args_t cargs{};
  cargs.out_tokens = out_tokens.get();
  cargs.indices = dargs.indices;
  cargs.weights = dargs.weights;
  cargs.expert_y = expert_y.get();
  cargs.bound_m = nullptr;
  cargs.num_tokens = num_tokens;
  cargs.accumulate = 0;

  auto dispatch = [&](int flags) {
    dargs.flags = flags;
    tools::check(ferry_a2a_dispatch(a2a.handle, &dargs, stream.get()), "ferry_a2a_dispatch");
    stream.sync();
  };
  auto combine = [&](int flags) {
    cargs.flags = flags;
    tools::check(ferry_a2a_combine(a2a.handle, &cargs, stream.get()), "ferry_a2a_combine");
    stream.sync();
  };
  auto barrier = [&] { boot->barrier(timeout_ms); };

  BenchResult result;
  result.options = o;
  result.world_size = world;
  result.launcher = launcher_label;
  result.provider = resolved_provider(o);
  if (o.backend == FERRY_DEVICE_HOST) result.host_threads = ep::host::host_threads(boot->local_size());
  result.sizes = sizes;

  // ---- verification: the first iteration, against the brute-force reference ----------------------
  if (o.verify) {
    result.verify_requested = true;
    std::string failure;
    indices.upload(mine.indices.data(), mine.indices.size() * sizeof(int32_t));
    weights.upload(mine.weights.data(), mine.weights.size() * sizeof(float));
    barrier();
    dispatch(FERRY_SEND_RECV);
    std::vector<int32_t> got_counts(num_local);
    std::vector<uint8_t> got_x(expert_x.bytes());
    std::vector<float> got_scale(rows * num_scales);
    expert_num_tokens.download(got_counts.data(), got_counts.size() * sizeof(int32_t));
    expert_x.download(got_x.data(), got_x.size());
    expert_x_scale.download(got_scale.data(), got_scale.size() * sizeof(float));
    if (rank == o.inject_verify_fault_rank) {
      for (int e = 0; e < num_local; ++e) {
        if (got_counts[e] > 0) {
          got_x[size_t(e) * sizes.max_rows_per_expert * o.hidden * in_elem] ^= 0x5a;
          break;
        }
      }
    }
    const auto want = ep::reference::dispatch(config, all_inputs, rank);
    failure = ep::reference::compare_dispatch(config, want, got_counts.data(), got_x.data(),
                                              num_scales ? got_scale.data() : nullptr);
    // Combine on what the experts of the standard model produce from the dispatched rows.
    std::vector<uint8_t> y(expert_y.bytes());
    ep::reference::apply_experts(layout, got_counts.data(), got_x.data(), num_scales ? got_scale.data() : nullptr,
                                 y.data());
    expert_y.upload(y.data(), y.size());
    barrier();
    combine(FERRY_SEND_RECV);
    if (failure.empty()) {
      std::vector<uint8_t> got_out(size_t(num_tokens) * o.hidden * out_elem);
      out_tokens.download(got_out.data(), got_out.size());
      const auto want_out = ep::reference::combine_standard(config, mine);
      const auto magnitude = ep::reference::combine_magnitude_standard(config, mine);
      const std::string c = ep::reference::compare_combine(config, want_out, magnitude, got_out.data(), num_tokens);
      if (!c.empty()) failure = "combine: " + c;
    } else {
      failure = "dispatch: " + failure;
    }
    const auto failed = tools::allgather_u64(*boot, failure.empty() ? 0 : 1, timeout_ms);
    for (int r = 0; r < world; ++r) if (failed[r]) result.verify_failed_ranks.push_back(r);
    result.verify_passed = result.verify_failed_ranks.empty();
    if (!failure.empty()) {
      std::fprintf(stderr, "ferry-bench: verify FAILED on rank %d: %s\n", rank, failure.c_str());
    }
    if (!result.verify_passed) {
      if (rank == 0) {
        std::fprintf(stderr, "ferry-bench: verify FAILED on rank(s) %s\n", join(result.verify_failed_ranks).c_str());
      }
      return 1;
    }
    all_inputs.clear();
    all_inputs.shrink_to_fit();
  }

  // ---- timed iterations -------------------------------------------------------------------------
  RoutingGenerator generator(o, rank, world);
  std::vector<int32_t> iter_indices(mine.indices);
  std::vector<float> iter_weights(mine.weights);
  if (iter_weights.size() < size_t(num_tokens) * o.topk) iter_weights.assign(size_t(num_tokens) * o.topk, 1.0f / o.topk);
  auto prepare_iteration = [&](int iter) {
    if (!file_routing) {
      iter_indices.resize(size_t(num_tokens) * o.topk);
      iter_weights.resize(size_t(num_tokens) * o.topk);
      generator.generate(iter, num_tokens, iter_indices.data(), iter_weights.data());
    }
    indices.upload(iter_indices.data(), iter_indices.size() * sizeof(int32_t));
    weights.upload(iter_weights.data(), iter_weights.size() * sizeof(float));
  };

  std::unique_ptr<Gemm> gemm;
  if (o.overlap) {
    gemm = device ? make_cuda_gemm(o.gemm_m, o.gemm_n, o.gemm_k, stream.get())
                  : make_host_gemm(o.gemm_m, o.gemm_n, o.gemm_k);
  }
  Samples s_dispatch, s_combine, s_dsend, s_drecv, s_csend, s_crecv, s_gemm, s_dover, s_cover;
  // What the experts would do between dispatch and combine (untimed): write their output rows, so
  // combine reads memory that holds data, as it would after the expert GEMMs, not pages the kernel
  // maps to its shared zero page (which stay in cache and flatter the host backend's combine).
  const std::vector<uint8_t> y_pattern = [&] {
    std::vector<uint8_t> p(o.hidden * out_elem);
    for (size_t i = 0; i < p.size(); ++i) p[i] = (i & 1) ? 0x3f : 0x80;  // 1.0 in bf16
    return p;
  }();
  auto produce_expert_output = [&] {
    if (device) return;  // device memory: no zero-page mapping to avoid
    const auto* counts = static_cast<const int32_t*>(expert_num_tokens.get());
    for (int e = 0; e < num_local; ++e) {
      for (int32_t row = 0; row < counts[e]; ++row) {
        std::memcpy(static_cast<uint8_t*>(expert_y.get()) + (size_t(e) * sizes.max_rows_per_expert + row) *
                                                                 y_pattern.size(),
                    y_pattern.data(), y_pattern.size());
      }
    }
  };
  Progress progress(o.progress && rank == 0);
  const int total_iters = o.warmup + o.iters;
  progress.phase("ferry", total_iters);
  for (int iter = 0; iter < total_iters; ++iter) {
    const bool timed = iter >= o.warmup;
    prepare_iteration(iter);
    ferry_a2a_stats_t stats{};

    barrier();
    auto t0 = Clock::now();
    dispatch(FERRY_SEND_RECV);
    double t = since_us(t0);
    tools::check(ferry_a2a_stats(a2a.handle, &stats), "ferry_a2a_stats");
    if (timed) { s_dispatch.add(t); s_dispatch.add_bytes(stats.dispatch_bytes_sent); }
    produce_expert_output();

    barrier();
    t0 = Clock::now();
    combine(FERRY_SEND_RECV);
    t = since_us(t0);
    tools::check(ferry_a2a_stats(a2a.handle, &stats), "ferry_a2a_stats");
    if (timed) { s_combine.add(t); s_combine.add_bytes(stats.combine_bytes_sent); }

    barrier();
    t0 = Clock::now();
    dispatch(FERRY_SEND);
    const double ts = since_us(t0);
    t0 = Clock::now();
    dispatch(FERRY_RECV);
    const double tr = since_us(t0);
    if (timed) { s_dsend.add(ts); s_drecv.add(tr); s_dsend.add_bytes(stats.dispatch_bytes_sent); }
    produce_expert_output();

    barrier();
    t0 = Clock::now();
    combine(FERRY_SEND);
    const double cs = since_us(t0);
    t0 = Clock::now();
    combine(FERRY_RECV);
    const double cr = since_us(t0);
    if (timed) { s_csend.add(cs); s_crecv.add(cr); s_csend.add_bytes(stats.combine_bytes_sent); }

    if (gemm) {
      barrier();
      t0 = Clock::now();
      gemm->run();
      if (timed) s_gemm.add(since_us(t0));
      barrier();
      t0 = Clock::now();
      dispatch(FERRY_SEND);
      gemm->run();
      dispatch(FERRY_RECV);
      if (timed) s_dover.add(since_us(t0));
      produce_expert_output();
      barrier();
      t0 = Clock::now();
      combine(FERRY_SEND);
      gemm->run();
      combine(FERRY_RECV);
      if (timed) s_cover.add(since_us(t0));
    }
    progress.step(iter + 1);
  }

  // ---- MPI baseline: the same records through MPI collectives -------------------------------------
  Samples b_dispatch, b_combine;
  const bool baseline = env.under_mpi() && MpiBaseline::available() && !device;
  if (baseline) {
    BaselineShape shape;
    shape.rank = rank;
    shape.world_size = world;
    shape.num_experts = o.experts;
    shape.topk = o.topk;
    shape.hidden = o.hidden;
    shape.dp_size = o.dp_size;
    shape.record_bytes = layout.record_bytes;
    shape.payload_bytes = layout.payload_bytes;
    shape.scale_bytes = layout.scale_bytes;
    shape.partial_bytes = layout.partial_bytes;
    shape.out_dtype = o.out_dtype;
    MpiBaseline mpi_a2a(shape, o.tokens);
    std::vector<uint8_t> baseline_out(size_t(o.tokens) * o.hidden * out_elem);
    progress.phase("MPI baseline", total_iters);
    for (int iter = 0; iter < total_iters; ++iter) {
      const bool timed = iter >= o.warmup;
      if (!file_routing) generator.generate(iter, num_tokens, iter_indices.data(), iter_weights.data());
      mpi_a2a.barrier();
      const double td = mpi_a2a.dispatch(iter_indices.data(), iter_weights.data(), mine.x.data(),
                                         num_scales ? mine.x_scale.data() : nullptr, num_tokens);
      if (timed) { b_dispatch.add(td); b_dispatch.add_bytes(mpi_a2a.last_dispatch_bytes_sent()); }
      mpi_a2a.produce_expert_output();
      mpi_a2a.barrier();
      const double tc = mpi_a2a.combine(baseline_out.data());
      if (timed) { b_combine.add(tc); b_combine.add_bytes(mpi_a2a.last_combine_bytes_sent()); }
      progress.step(iter + 1);
    }
    result.baseline_kind = "mpi";
    result.mpi_transport = read_mpi_transport();
    result.mpi_transport_chooser = mpi_transport_chooser();
  } else if (device) {
    result.baseline_note = "the MPI baseline moves host memory; it runs with --backend host";
  } else {
#if defined(FERRY_HAVE_MPI)
    result.baseline_note = "not launched by MPI: run under mpirun, or --local-ranks N --launcher mpi";
#else
    result.baseline_note = "this ferry-bench was built without MPI";
#endif
  }

  // ---- --overlap tbo: the MoE layer, plain and with two micro-batches ------------------------------
  if (o.overlap_tbo) {
    progress.phase("MoE layer (--overlap tbo)", 2 * (o.warmup + o.iters));
    result.overlap_tbo = run_tbo(o, *boot, cboot.get(), config.cuda_device);
    if (o.verify && !result.overlap_tbo->verified) {
      if (rank == 0)
        std::fprintf(stderr, "ferry-bench: --overlap tbo verify FAILED on rank(s) %s\n",
                     join(result.overlap_tbo->verify_failed_ranks).c_str());
      return 1;
    }
  }

  // ---- gather to rank 0 and report ------------------------------------------------------------------
  result.ferry.push_back(summarize(*boot, "dispatch", s_dispatch, timeout_ms));
  result.ferry.push_back(summarize(*boot, "combine", s_combine, timeout_ms));
  result.ferry.push_back(summarize(*boot, "dispatch_send", s_dsend, timeout_ms));
  result.ferry.push_back(summarize(*boot, "dispatch_recv", s_drecv, timeout_ms));
  result.ferry.push_back(summarize(*boot, "combine_send", s_csend, timeout_ms));
  result.ferry.push_back(summarize(*boot, "combine_recv", s_crecv, timeout_ms));
  // Every rank agrees on whether a baseline ran (all are under MPI or none).
  const auto baseline_ranks = tools::allgather_u64(*boot, baseline ? 1 : 0, timeout_ms);
  if (std::all_of(baseline_ranks.begin(), baseline_ranks.end(), [](uint64_t v) { return v == 1; })) {
    result.baseline.push_back(summarize(*boot, "dispatch", b_dispatch, timeout_ms));
    result.baseline.push_back(summarize(*boot, "combine", b_combine, timeout_ms));
  }
  if (gemm) {
    OverlapResult ov;
    ov.gemm_m = o.gemm_m;
    ov.gemm_n = o.gemm_n;
    ov.gemm_k = o.gemm_k;
    ov.gemm_flops = gemm->flops();
    ov.gemm_alone_us = summarize(*boot, "gemm", s_gemm, timeout_ms).latency_us.p50;
    ov.dispatch_overlapped = summarize(*boot, "dispatch_overlapped", s_dover, timeout_ms);
    ov.combine_overlapped = summarize(*boot, "combine_overlapped", s_cover, timeout_ms);
    auto hidden = [&](const char* send, const char* recv, const OpResult& over) {
      double t_send = 0, t_recv = 0;
      for (const auto& op : result.ferry) {
        if (op.name == send) t_send = op.latency_us.p50;
        if (op.name == recv) t_recv = op.latency_us.p50;
      }
      const double transfer = t_send + t_recv;
      return transfer > 0 ? (transfer + ov.gemm_alone_us - over.latency_us.p50) / transfer : 0.0;
    };
    ov.dispatch_hidden_fraction = hidden("dispatch_send", "dispatch_recv", ov.dispatch_overlapped);
    ov.combine_hidden_fraction = hidden("combine_send", "combine_recv", ov.combine_overlapped);
    result.overlap = ov;
  }
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  const auto hosts = tools::allgather_strings(*boot, host, timeout_ms);
  result.num_hosts = static_cast<int>(std::set<std::string>(hosts.begin(), hosts.end()).size());
  result.local_nodes = nodes.local_nodes;
  result.rank_nodes = tools::allgather_strings(*boot, tools::node_label(), timeout_ms);
  result.num_nodes = static_cast<int>(std::set<std::string>(result.rank_nodes.begin(), result.rank_nodes.end()).size());
  const auto node_ids_set = tools::allgather_u64(*boot, nodes.node_id.empty() ? 0 : 1, timeout_ms);
  result.node_ids_set = std::any_of(node_ids_set.begin(), node_ids_set.end(), [](uint64_t v) { return v != 0; });
  result.node_ids_from_user = nodes.user_node_id;
  barrier();

  if (rank == 0) {
    result.host = tools::collect_host_info(result.provider);
    result.wall_seconds = since_us(wall0) / 1e6;
    print_table(result, stdout);
    if (!o.json_path.empty()) write_json(result, o.json_path);
    if (!o.csv_path.empty()) write_csv(result, o.csv_path);
  }
  return 0;
}

}  // namespace ferry::bench
