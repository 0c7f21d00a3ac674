// How a schedule's overlap is measured, per iteration and on every rank, each behind a bootstrap
// barrier: the whole schedule (step), its transfers alone (the same order without the GEMMs), and its
// GEMMs alone (on the rows the transfers just delivered). A step is done when its slowest rank is,
// so each iteration counts the slowest rank's time; the p50s over iterations give
//   hidden fraction = 1 - (step - GEMM) / transfer
// 0 when the step costs GEMM + transfer (nothing overlapped), 1 when it costs the GEMM alone.
#pragma once
#include <vector>

#include "bench/moe_layer/layer.h"
#include "tools/common/report.h"
#include "transfer_engine/bootstrap.h"

namespace ferry::moe {

struct ScheduleSamples {  // this rank, one entry per timed iteration
  std::vector<double> step_us, transfer_us, gemm_us;
};

// The schedule, its transfers and its GEMMs, warmup + iters times (collective: every rank).
ScheduleSamples time_schedule(MoeLayer& layer, te::Bootstrap& bootstrap, const Schedule& schedule, int warmup,
                              int iters, int timeout_ms);

struct ScheduleTiming {
  tools::Percentiles step_us, transfer_us, gemm_us;  // over iterations of the slowest rank's time
  double hidden_fraction = 0;                       // from the p50s
};
// Collective: gathers every rank's samples.
ScheduleTiming summarize_schedule(te::Bootstrap& bootstrap, const ScheduleSamples& mine, int timeout_ms);

double hidden_fraction(double step_us, double gemm_us, double transfer_us);

}  // namespace ferry::moe
