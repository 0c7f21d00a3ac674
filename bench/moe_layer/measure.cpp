#include "bench/moe_layer/measure.h"

#include <algorithm>
#include <chrono>

#include "transfer_engine/error.h"

namespace ferry::moe {

namespace {

using Clock = std::chrono::steady_clock;

// Per iteration the largest of the ranks' samples (every rank timed the same number).
tools::Percentiles slowest_rank(te::Bootstrap& boot, const std::vector<double>& mine, int timeout_ms) {
  std::vector<int> counts;
  const std::vector<double> all = tools::allgather_values(boot, mine, timeout_ms, &counts);
  for (int c : counts)
    if (c != int(mine.size())) raise(Status::internal, "ranks timed different numbers of iterations");
  std::vector<double> step(mine.size(), 0.0);
  for (size_t r = 0; r < counts.size(); ++r)
    for (size_t i = 0; i < mine.size(); ++i) step[i] = std::max(step[i], all[r * mine.size() + i]);
  return tools::percentiles(step);
}

}  // namespace

ScheduleSamples time_schedule(MoeLayer& layer, te::Bootstrap& boot, const Schedule& schedule, int warmup, int iters,
                              int timeout_ms) {
  const Schedule transfers = transfers_of(schedule), gemms = gemms_of(schedule);
  ScheduleSamples s;
  auto timed = [&](const Schedule& part) {
    boot.barrier(timeout_ms);
    const auto t0 = Clock::now();
    layer.run(part);
    return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  };
  for (int i = 0; i < warmup + iters; ++i) {
    const double step = timed(schedule), transfer = timed(transfers), gemm = timed(gemms);
    if (i < warmup) continue;
    s.step_us.push_back(step);
    s.transfer_us.push_back(transfer);
    s.gemm_us.push_back(gemm);
  }
  return s;
}

ScheduleTiming summarize_schedule(te::Bootstrap& boot, const ScheduleSamples& mine, int timeout_ms) {
  ScheduleTiming t;
  t.step_us = slowest_rank(boot, mine.step_us, timeout_ms);
  t.transfer_us = slowest_rank(boot, mine.transfer_us, timeout_ms);
  t.gemm_us = slowest_rank(boot, mine.gemm_us, timeout_ms);
  t.hidden_fraction = hidden_fraction(t.step_us.p50, t.gemm_us.p50, t.transfer_us.p50);
  return t;
}

double hidden_fraction(double step_us, double gemm_us, double transfer_us) {
  return transfer_us > 0 ? 1.0 - (step_us - gemm_us) / transfer_us : 0.0;
}

}  // namespace ferry::moe
