#include "bench/ep/tbo.h"

#include "bench/moe_layer/layer.h"
#include "bench/moe_layer/measure.h"
#include "bench/moe_layer/reference.h"
#include "bench/moe_layer/verify.h"
#include "transfer_engine/error.h"

namespace ferry::bench {

TboResult run_tbo(const Options& o, te::Bootstrap& boot, ferry_bootstrap_t cboot, int cuda_device) {
  moe::LayerOptions lo;
  moe::LayerShape& s = lo.shape;
  s.world_size = boot.world_size();
  s.tp_size = o.dp_size;
  s.num_experts = o.experts;
  s.top_k = o.topk;
  s.hidden = o.hidden;
  s.intermediate = o.expert_intermediate;
  s.tokens = o.tokens;
  s.out_dtype = o.out_dtype;
  s.seed = o.seed;
  if (const std::string bad = moe::check_shape(s); !bad.empty()) raise(Status::invalid_argument, "--overlap tbo: " + bad);
  lo.rank = boot.rank();
  lo.device = o.backend;
  lo.cuda_device = cuda_device;
  lo.provider = o.provider;
  lo.nets_per_rank = o.nets_per_rank;
  lo.timeout_ms = o.timeout_ms;
  lo.micro_batches = 2;
  lo.gemm_threads = moe::default_gemm_threads(boot.local_size());
  moe::MoeLayer layer(lo, cboot);
  // The group's hidden states as its TP all-reduce gives them (ferry-moe-layer times that part).
  layer.set_tokens(moe::hidden_states(s, s.group_of(boot.rank())).data());

  TboResult r;
  r.intermediate = s.intermediate;
  r.gemm = layer.gemm_description();
  for (int b = 0; b < layer.num_handles(); ++b) r.handle_bytes.push_back(layer.buffer_sizes(b).total_registered_bytes);
  if (o.verify) {
    const moe::ReferenceOutput want = moe::reference_layer(s, s.group_of(boot.rank()));
    std::string failure;
    for (moe::ScheduleKind kind : {moe::ScheduleKind::plain, moe::ScheduleKind::tbo}) {
      boot.barrier(o.timeout_ms);
      failure += moe::verify_schedule(layer, s, want, boot.rank(), kind);
    }
    if (!failure.empty()) std::fprintf(stderr, "ferry-bench: --overlap tbo verify failed:\n%s", failure.c_str());
    const auto failed = tools::allgather_u64(boot, failure.empty() ? 0 : 1, o.timeout_ms);
    for (int rank = 0; rank < boot.world_size(); ++rank)
      if (failed[size_t(rank)]) r.verify_failed_ranks.push_back(rank);
    r.verified = r.verify_failed_ranks.empty();
  }
  for (moe::ScheduleKind kind : {moe::ScheduleKind::plain, moe::ScheduleKind::tbo}) {
    const moe::Schedule schedule = moe::make_schedule(kind);
    const moe::ScheduleSamples samples = moe::time_schedule(layer, boot, schedule, o.warmup, o.iters, o.timeout_ms);
    const moe::ScheduleTiming t = moe::summarize_schedule(boot, samples, o.timeout_ms);
    r.schedules.push_back({moe::schedule_name(kind), moe::describe(schedule), t.transfer_us, t.gemm_us, t.step_us,
                           t.hidden_fraction});
  }
  return r;
}

}  // namespace ferry::bench
