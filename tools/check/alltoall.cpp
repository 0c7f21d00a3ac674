// Stage 4: dispatch and combine through the public C API at this job's EP size, every byte of every
// iteration compared with the brute-force reference, timed per rank.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>

#include "csrc/backend.h"
#include "csrc/reference.h"
#include "tools/check/check.h"
#include "tools/common/bootstrap.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

namespace ferry::check {

namespace ref = ep::reference;
using Clock = std::chrono::steady_clock;

namespace {

struct Case {
  std::string shape;
  std::string routing;
  int num_tokens;
  int hidden;
  int top_k;
  int experts_per_rank;
  ferry_dtype_t in_dtype;
  int scale_block;
};

const char* dtype_name(ferry_dtype_t d) {
  switch (d) {
    case FERRY_BF16: return "bf16";
    case FERRY_F16: return "f16";
    case FERRY_F32: return "f32";
    case FERRY_FP8_E4M3: return "fp8_e4m3";
  }
  return "?";
}

std::vector<Case> cases_for(const Options& opt) {
  std::vector<Case> out;
  const int decode_tokens = std::max(1, opt.a2a_tokens);
  const int wide_tokens = std::max(1, opt.a2a_tokens / 4);
  for (const char* routing : {"uniform", "skewed", "all_to_one"}) {
    // Decode-like: fp8 payload with block scales, top-4 of 4 experts per rank.
    out.push_back(Case{"decode", routing, decode_tokens, opt.a2a_decode_hidden, 4, 4, FERRY_FP8_E4M3, 128});
    // A larger hidden in bf16 without scales.
    out.push_back(Case{"wide", routing, wide_tokens, opt.a2a_wide_hidden, 2, 2, FERRY_BF16, 0});
  }
  return out;
}

// The inputs of every rank for a case. all_to_one sends every route of every token to the experts
// of the last rank, the worst incast a router can produce.
std::vector<ref::RankInput> inputs_for(const ferry_a2a_config_t& config, const Case& c, uint64_t seed) {
  ref::InputSpec spec;
  spec.seed = seed;
  spec.routing = c.routing == "skewed" ? ref::Routing::zipf : ref::Routing::uniform;
  std::vector<ref::RankInput> inputs = ref::generate_all(config, spec);
  if (c.routing == "all_to_one") {
    const int target = config.world_size - 1;
    const int per_rank = config.num_experts / config.world_size;
    for (ref::RankInput& in : inputs)
      for (int t = 0; t < in.num_tokens; ++t)
        for (int k = 0; k < config.experts_per_token; ++k)
          in.indices[size_t(t) * config.experts_per_token + k] = target * per_rank + (t + k) % per_rank;
  }
  return inputs;
}

struct A2a {
  ferry_a2a_t handle = nullptr;
  ~A2a() {
    if (handle) ferry_a2a_destroy(handle);
  }
};

struct CaseOutcome {
  std::vector<double> dispatch_us, combine_us;
  uint64_t bytes_checked = 0;
};

CaseOutcome run_case(const Options& opt, const ferry_a2a_config_t& config, const Case& c,
                     tools::CBootstrap& cboot) {
  const int me = config.rank;
  const std::vector<ref::RankInput> inputs = inputs_for(config, c, opt.seed);
  const ref::RankInput& in = inputs[size_t(me)];
  const ref::DispatchResult want = ref::dispatch(config, inputs, me);
  const std::vector<float> want_out = ref::combine_standard(config, in);
  const std::vector<float> magnitude = ref::combine_magnitude_standard(config, in);
  const ep::Layout layout = ep::make_layout(config);

  A2a a2a;
  tools::check(ferry_a2a_create(&config, cboot.get(), &a2a.handle), "ferry_a2a_create");
  ferry_buffer_sizes_t sizes{};
  tools::check(ferry_a2a_buffer_bytes(a2a.handle, &sizes), "ferry_a2a_buffer_bytes");
  const size_t rows = size_t(sizes.num_local_experts) * size_t(sizes.max_rows_per_expert);
  std::vector<int32_t> counts(size_t(sizes.num_local_experts));
  std::vector<uint8_t> expert_x(rows * layout.payload_bytes);
  std::vector<float> expert_x_scale(layout.num_scales > 0 ? rows * size_t(layout.num_scales) : 0);
  std::vector<uint8_t> expert_y(rows * size_t(config.hidden_dim) * size_t(layout.out_elem_bytes));
  std::vector<uint8_t> out_tokens(size_t(std::max(1, in.num_tokens)) * size_t(config.hidden_dim) *
                                  size_t(layout.out_elem_bytes));

  CaseOutcome outcome;
  for (int iter = 0; iter < opt.a2a_warmup + opt.a2a_iters; ++iter) {
    // Stale rows from the previous iteration must not pass for this one's.
    std::fill(counts.begin(), counts.end(), -1);
    std::memset(expert_x.data(), 0xcd, expert_x.size());
    std::fill(expert_x_scale.begin(), expert_x_scale.end(), -1.0f);
    ferry_dispatch_args_t d{};
    d.out_expert_num_tokens = counts.data();
    d.out_expert_x = expert_x.data();
    d.out_expert_x_scale = expert_x_scale.empty() ? nullptr : expert_x_scale.data();
    d.dp_x = in.x.data();
    d.dp_x_scale = in.x_scale.empty() ? nullptr : in.x_scale.data();
    d.indices = in.indices.data();
    d.weights = in.weights.data();
    d.bound_m = nullptr;
    d.num_tokens = in.num_tokens;
    d.flags = FERRY_SEND_RECV;
    auto t0 = Clock::now();
    tools::check(ferry_a2a_dispatch(a2a.handle, &d, nullptr), "ferry_a2a_dispatch");
    const double dispatch_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    std::string bad = ref::compare_dispatch(config, want, counts.data(), expert_x.data(),
                                            expert_x_scale.empty() ? nullptr : expert_x_scale.data());
    if (!bad.empty())
      raise(Status::internal, "rank " + std::to_string(me) + ": dispatch output differs from the reference in iteration " +
                                  std::to_string(iter) + ": " + bad);
    uint64_t rows_received = 0;
    for (int32_t n : counts) rows_received += uint64_t(std::max(0, n));
    outcome.bytes_checked += rows_received * (layout.payload_bytes + layout.scale_bytes) + counts.size() * 4;

    std::memset(expert_y.data(), 0, expert_y.size());
    ref::apply_experts(layout, counts.data(), expert_x.data(),
                       expert_x_scale.empty() ? nullptr : expert_x_scale.data(), expert_y.data());
    std::memset(out_tokens.data(), 0xcd, out_tokens.size());
    ferry_combine_args_t cb{};
    cb.out_tokens = out_tokens.data();
    cb.indices = in.indices.data();
    cb.weights = in.weights.data();
    cb.expert_y = expert_y.data();
    cb.bound_m = nullptr;
    cb.num_tokens = in.num_tokens;
    cb.accumulate = 0;
    cb.flags = FERRY_SEND_RECV;
    t0 = Clock::now();
    tools::check(ferry_a2a_combine(a2a.handle, &cb, nullptr), "ferry_a2a_combine");
    const double combine_us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    bad = ref::compare_combine(config, want_out, magnitude, out_tokens.data(), in.num_tokens);
    if (!bad.empty())
      raise(Status::internal, "rank " + std::to_string(me) + ": combine output differs from the reference in iteration " +
                                  std::to_string(iter) + ": " + bad);
    outcome.bytes_checked += uint64_t(in.num_tokens) * uint64_t(config.hidden_dim) * uint64_t(layout.out_elem_bytes);
    if (iter >= opt.a2a_warmup) {
      outcome.dispatch_us.push_back(dispatch_us);
      outcome.combine_us.push_back(combine_us);
    }
  }
  return outcome;
}

}  // namespace

Share run_alltoall(const Options& opt, te::Bootstrap& boot, const std::vector<RankInventory>& all) {
  Share share;
  const int me = boot.rank();
  const int world = boot.world_size();
  // Every rank uses the same number of NICs (the fewest any rank has), its own available ones first.
  int nets = 1 << 20;
  for (const RankInventory& inv : all) {
    int usable = 0;
    for (int s = 0; s < int(inv.nics.size()); ++s) usable += nic_problem(inv, s).empty();
    nets = std::min(nets, usable);
  }
  const RankInventory& mine = all[size_t(me)];
  if (nets <= 0) {
    if (me != 0) return share;
    share.checks.push_back(CheckResult{"alltoall", "dispatch/combine", Verdict::fail,
                                       "not run: some rank has no usable NIC (see inventory)", nlohmann::json::object()});
    return share;
  }
  std::string domains;
  int taken = 0;
  for (int s = 0; s < int(mine.nics.size()) && taken < nets; ++s) {
    if (!nic_problem(mine, s).empty()) continue;
    domains += (taken ? "," : "") + mine.nics[size_t(s)];
    ++taken;
  }
  // The C API takes its NICs from FERRY_DOMAINS (the config names only a count).
  ::setenv("FERRY_DOMAINS", domains.c_str(), 1);
  tools::CBootstrap cboot(boot, opt.collective_timeout_ms());

  const std::vector<Case> cases = cases_for(opt);
  bool stop = false;
  std::string stop_reason;
  for (const Case& c : cases) {
    const std::string name = c.shape + " " + dtype_name(c.in_dtype) + " " + c.routing;
    AlltoallResult res;
    res.shape = c.shape;
    res.routing = c.routing;
    res.num_tokens = c.num_tokens;
    res.hidden = c.hidden;
    res.top_k = c.top_k;
    res.num_experts = c.experts_per_rank * world;
    res.dtype = dtype_name(c.in_dtype);
    res.iterations = opt.a2a_iters;
    if (stop) {
      res.error = stop_reason;
      if (me == 0) {
        share.alltoall.push_back(res);
        share.checks.push_back(CheckResult{"alltoall", name, Verdict::skip, stop_reason, nlohmann::json::object()});
      }
      continue;
    }
    progress(me, "alltoall: %s, %d tokens x %d hidden, %d ranks", name.c_str(), c.num_tokens, c.hidden, world);
    ferry_a2a_config_t config;
    ferry_a2a_config_init(&config);
    config.rank = me;
    config.world_size = world;
    config.num_experts = res.num_experts;
    config.experts_per_token = c.top_k;
    config.max_tokens_per_rank = c.num_tokens;
    config.hidden_dim = c.hidden;
    config.in_dtype = c.in_dtype;
    config.scale_block = c.scale_block;
    config.out_dtype = FERRY_BF16;
    config.expert_alignment = 1;
    config.device = FERRY_DEVICE_HOST;
    config.nets_per_rank = nets;
    config.provider = opt.provider.c_str();
    config.timeout_ms = opt.timeout_ms;
    config.dp_size = 1;
    config.private_tokens = -1;

    std::string error;
    CaseOutcome outcome;
    try {
      outcome = run_case(opt, config, c, cboot);
    } catch (const std::exception& e) {
      error = e.what();
      rank_failure(me, "alltoall " + name + ": " + error);
    }
    // Every rank learns every rank's outcome (and its timings), so all stop together after a failure
    // and the verdict uses the slowest rank's percentiles.
    const tools::Percentiles dp = tools::percentiles(outcome.dispatch_us);
    const tools::Percentiles cp = tools::percentiles(outcome.combine_us);
    const std::vector<double> mine_values = {error.empty() ? 1.0 : 0.0, dp.p50, dp.p99, cp.p50, cp.p99,
                                             double(outcome.bytes_checked)};
    const std::vector<double> everyone = tools::allgather_values(boot, mine_values, opt.collective_timeout_ms());
    const std::vector<std::string> errors = tools::allgather_strings(boot, error, opt.collective_timeout_ms());
    std::vector<int> failed_ranks;
    res.dispatch_us_p50 = res.dispatch_us_p99 = res.combine_us_p50 = res.combine_us_p99 = 0;
    for (int r = 0; r < world; ++r) {
      const double* v = &everyone[size_t(r) * mine_values.size()];
      if (v[0] == 0.0) failed_ranks.push_back(r);
      res.dispatch_us_p50 = std::max(res.dispatch_us_p50, v[1]);
      res.dispatch_us_p99 = std::max(res.dispatch_us_p99, v[2]);
      res.combine_us_p50 = std::max(res.combine_us_p50, v[3]);
      res.combine_us_p99 = std::max(res.combine_us_p99, v[4]);
      res.bytes_checked += uint64_t(v[5]);
    }
    CheckResult check{"alltoall", name, Verdict::pass, "", nlohmann::json::object()};
    check.metrics = {{"num_tokens", c.num_tokens}, {"hidden", c.hidden}, {"top_k", c.top_k},
                     {"num_experts", res.num_experts}, {"dtype", res.dtype}, {"iterations", opt.a2a_iters},
                     {"bytes_checked", res.bytes_checked}, {"dispatch_us_p50", res.dispatch_us_p50},
                     {"dispatch_us_p99", res.dispatch_us_p99}, {"combine_us_p50", res.combine_us_p50},
                     {"combine_us_p99", res.combine_us_p99}, {"nets_per_rank", nets}};
    if (!failed_ranks.empty()) {
      std::string list;
      for (int r : failed_ranks) list += (list.empty() ? "" : ", ") + std::to_string(r);
      res.ok = false;
      std::string why;
      for (int r : failed_ranks) why += "; rank " + std::to_string(r) + ": " + errors[size_t(r)];
      res.error = "failed on rank(s) " + list + why;
      res.dispatch_us_p50 = res.dispatch_us_p99 = res.combine_us_p50 = res.combine_us_p99 = -1;
      check.verdict = Verdict::fail;
      check.reason = res.error;
      stop = true;
      stop_reason = "not run after " + name + " failed on rank(s) " + list;
    } else {
      res.ok = true;
      // Limits apply to the tail: a p99 over the limit is what a serving stack would feel.
      if (opt.max_dispatch_us > 0 && res.dispatch_us_p99 > opt.max_dispatch_us) {
        check.verdict = Verdict::fail;
        check.reason = tools::format("dispatch p99 %.1f us over --max-dispatch-us %.1f (p50 %.1f us)",
                                     res.dispatch_us_p99, opt.max_dispatch_us, res.dispatch_us_p50);
      }
      if (opt.max_combine_us > 0 && res.combine_us_p99 > opt.max_combine_us) {
        check.verdict = Verdict::fail;
        check.reason += (check.reason.empty() ? "" : "; ") +
                        tools::format("combine p99 %.1f us over --max-combine-us %.1f (p50 %.1f us)",
                                      res.combine_us_p99, opt.max_combine_us, res.combine_us_p50);
      }
      if (check.verdict == Verdict::fail) res.error = check.reason;
    }
    // The verdict is the same on every rank; rank 0's copy goes into the report.
    if (me == 0) {
      share.alltoall.push_back(res);
      share.checks.push_back(std::move(check));
    }
  }
  return share;
}

}  // namespace ferry::check
