// Google Benchmark of the all-to-all's CPU pieces at the decode shape (128 tokens per rank, hidden
// 7168, fp8 with 128-element scales in, bf16 out, top-8 of 256 experts): the plan (routing check,
// send plan with its prefix sums, count headers, receive plan) at EP8..EP64, the host backend's byte
// movers (pack, unpack, combine send and receive) per byte they write, and the record-header check.
// Inputs come from the reference generator, so every rank's step is one a real run would make.
//
//   ferry-micro-ep --benchmark_out=ep.json --benchmark_out_format=json
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "csrc/backend.h"
#include "csrc/host/pack.h"
#include "csrc/host/work_pool.h"
#include "csrc/plan.h"
#include "csrc/reference.h"
#include "ferry/ferry.h"

namespace ferry::ep {
namespace {

ferry_a2a_config_t decode_config(int world_size, int rank = 0) {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.world_size = world_size;
  c.rank = rank;
  c.num_experts = 256;
  c.experts_per_token = 8;
  c.max_tokens_per_rank = 128;
  c.hidden_dim = 7168;
  c.in_dtype = FERRY_FP8_E4M3;
  c.out_dtype = FERRY_BF16;
  c.scale_block = 128;
  return c;
}

// One step of the whole job seen from rank 0: every rank's inputs and send plan, the count matrix,
// rank 0's receive plan and its receive buffer filled with what every sender packed for it (placed
// where the protocol's writes put it).
struct Step {
  explicit Step(int world_size) : config(decode_config(world_size)), layout(make_layout(config)) {
    inputs = reference::generate_all(config, reference::InputSpec{});
    const int w = world_size, epr = layout.experts_per_rank;
    count_matrix.assign(size_t(w) * w, 0);
    expert_counts.assign(size_t(w) * epr, 0);
    recv.assign(layout.recv_buffer_bytes(), 0);
    std::vector<uint8_t> send(layout.send_buffer_bytes());
    std::vector<std::vector<uint8_t>> to_rank0(static_cast<size_t>(w));  // each sender's run for rank 0
    for (int s = 0; s < w; ++s) {
      const reference::RankInput& in = inputs[size_t(s)];
      Layout sl = layout;
      sl.rank = s;
      plans.push_back(make_send_plan(sl, in.indices.data(), in.num_tokens, 0));
      const SendPlan& p = plans.back();
      for (int d = 0; d < w; ++d) count_matrix[size_t(s) * w + d] = p.dest_count[size_t(d)];
      for (int e = 0; e < epr; ++e) expert_counts[size_t(s) * epr + e] = p.dest_expert_count[size_t(e)];
      host::pack_dispatch(sl, p, in.x.data(), in.x_scale.data(), in.indices.data(), in.weights.data(), send.data());
      const uint8_t* run = send.data() + layout.send_record_offset(0, 0, 0);
      to_rank0[size_t(s)].assign(run, run + uint64_t(p.dest_count[0]) * layout.record_bytes);
    }
    recv_plan = make_recv_plan(layout, count_matrix.data(), expert_counts.data());
    for (int s = 0; s < w; ++s)
      for (int p = 0; p < plans[size_t(s)].dest_count[0]; ++p)
        std::memcpy(recv.data() + layout.recv_record_offset(s, p, recv_plan.overflow_before[size_t(s)]),
                    to_rank0[size_t(s)].data() + uint64_t(p) * layout.record_bytes, layout.record_bytes);
  }
  ferry_a2a_config_t config;
  Layout layout;
  std::vector<reference::RankInput> inputs;
  std::vector<SendPlan> plans;
  std::vector<int32_t> count_matrix, expert_counts;
  RecvPlan recv_plan;
  std::vector<uint8_t> recv;
};

// ---- plan ----------------------------------------------------------------------------------------

void BM_SendPlan(benchmark::State& state) {
  const Step step(int(state.range(0)));
  const reference::RankInput& in = step.inputs[0];
  for (auto _ : state) {
    validate_routing(step.layout, in.indices.data(), in.num_tokens);
    SendPlan plan = make_send_plan(step.layout, in.indices.data(), in.num_tokens, 0);
    benchmark::DoNotOptimize(plan.total_records);
  }
  state.SetItemsProcessed(state.iterations() * in.num_tokens);
  state.counters["tokens"] = in.num_tokens;
}
BENCHMARK(BM_SendPlan)->ArgName("ep")->Arg(8)->Arg(16)->Arg(32)->Arg(64);

void BM_CountHeaders(benchmark::State& state) {
  const Step step(int(state.range(0)));
  const int w = step.layout.world_size;
  std::vector<uint8_t> headers(size_t(w) * step.layout.count_header_bytes);
  std::vector<int32_t> counts(static_cast<size_t>(w)), expert_counts(static_cast<size_t>(step.layout.experts_per_rank));
  for (auto _ : state) {
    for (int d = 0; d < w; ++d)
      write_count_header(step.layout, step.plans[0], d, headers.data() + size_t(d) * step.layout.count_header_bytes);
    // What a receiver does with each: check it before it indexes anything.
    for (int d = 0; d < w; ++d) {
      std::string bad = check_count_header(step.layout, headers.data() + size_t(d) * step.layout.count_header_bytes,
                                           counts.data(), expert_counts.data());
      benchmark::DoNotOptimize(bad);
    }
  }
  state.SetItemsProcessed(state.iterations() * w);
}
BENCHMARK(BM_CountHeaders)->ArgName("ep")->Arg(8)->Arg(16)->Arg(32)->Arg(64);

void BM_RecvPlan(benchmark::State& state) {
  const Step step(int(state.range(0)));
  for (auto _ : state) {
    RecvPlan plan = make_recv_plan(step.layout, step.count_matrix.data(), step.expert_counts.data());
    benchmark::DoNotOptimize(plan.total_records);
  }
  state.counters["records"] = step.recv_plan.total_records;
}
BENCHMARK(BM_RecvPlan)->ArgName("ep")->Arg(8)->Arg(16)->Arg(32)->Arg(64);

// ---- host byte movers (bytes = what they write) -----------------------------------------------------

void BM_PackDispatch(benchmark::State& state) {
  const Step step(int(state.range(0)));
  const reference::RankInput& in = step.inputs[0];
  std::vector<uint8_t> send(step.layout.send_buffer_bytes());
  for (auto _ : state) {
    host::pack_dispatch(step.layout, step.plans[0], in.x.data(), in.x_scale.data(), in.indices.data(),
                        in.weights.data(), send.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * int64_t(step.plans[0].total_records) * int64_t(step.layout.record_bytes));
}
BENCHMARK(BM_PackDispatch)->ArgName("ep")->Arg(8)->Arg(64);

struct Unpacked {
  explicit Unpacked(const Layout& l)
      : num_tokens(size_t(l.experts_per_rank)),
        x(size_t(l.experts_per_rank) * l.max_rows_per_expert * l.payload_bytes),
        scale(size_t(l.experts_per_rank) * l.max_rows_per_expert * l.num_scales) {}
  std::vector<int32_t> num_tokens;
  std::vector<uint8_t> x;
  std::vector<float> scale;
  host::ReceivedRoutes routes;
};

void BM_UnpackDispatch(benchmark::State& state) {
  const Step step(int(state.range(0)));
  Unpacked out(step.layout);
  for (auto _ : state) {
    host::unpack_dispatch(step.layout, step.recv_plan, step.recv.data(), out.num_tokens.data(), out.x.data(),
                          out.scale.data(), out.routes);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * int64_t(step.recv_plan.total_records) *
                          int64_t(step.layout.payload_bytes + step.layout.scale_bytes));
}
BENCHMARK(BM_UnpackDispatch)->ArgName("ep")->Arg(8)->Arg(64);

// What combine-send reads: the routes of a step's received records and the experts' output rows.
struct CombineInputs {
  explicit CombineInputs(const Step& step)
      : out(step.layout),
        expert_y(size_t(step.layout.experts_per_rank) * step.layout.max_rows_per_expert * step.layout.hidden, 0x3f80),
        combine_send(step.layout.combine_send_bytes()) {
    host::unpack_dispatch(step.layout, step.recv_plan, step.recv.data(), out.num_tokens.data(), out.x.data(),
                          out.scale.data(), out.routes);
  }
  Unpacked out;
  std::vector<uint16_t> expert_y;
  std::vector<uint8_t> combine_send;
};

void BM_PackCombine(benchmark::State& state) {
  const Step step(int(state.range(0)));
  CombineInputs in(step);
  const Layout& l = step.layout;
  for (auto _ : state) {
    host::pack_combine(l, in.out.routes, in.expert_y.data(), in.combine_send.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * int64_t(step.recv_plan.total_records) * int64_t(l.partial_bytes));
}
BENCHMARK(BM_PackCombine)->ArgName("ep")->Arg(8)->Arg(64);

// The same over the host backend's helper threads (its parts and minimum part size), the caller
// included: how combine-send scales where a rank has cores to spare.
void BM_PackCombineThreads(benchmark::State& state) {
  const Step step(8);
  CombineInputs in(step);
  const Layout& l = step.layout;
  host::WorkPool pool(int(state.range(0)));
  const int64_t records = int64_t(in.out.routes.num_routes.size());
  for (auto _ : state) {
    pool.parallel_for(records, host::min_part_items(l.combine_slot_bytes()), [&](int64_t first, int64_t end) {
      host::pack_combine_records(l, in.out.routes, in.expert_y.data(), in.combine_send.data(), first, end);
    });
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * int64_t(step.recv_plan.total_records) * int64_t(l.partial_bytes));
}
BENCHMARK(BM_PackCombineThreads)->ArgName("threads")->Arg(1)->Arg(2)->UseRealTime();

void BM_UnpackCombine(benchmark::State& state) {
  const Step step(int(state.range(0)));
  const Layout& l = step.layout;
  std::vector<uint16_t> partials(l.combine_recv_bytes() / 2, 0x3f80);
  std::vector<uint16_t> out_tokens(size_t(l.max_tokens) * l.hidden);
  const std::span<const SendPlan> plans(&step.plans[0], 1);
  for (auto _ : state) {
    host::unpack_combine(l, plans, partials.data(), out_tokens.data(), false);
    benchmark::ClobberMemory();
  }
  // Reads one partial per record, writes one row per token.
  state.SetBytesProcessed(state.iterations() * int64_t(step.plans[0].total_records) * int64_t(l.partial_bytes));
}
BENCHMARK(BM_UnpackCombine)->ArgName("ep")->Arg(8)->Arg(64);

// ---- the check every received record passes --------------------------------------------------------

void BM_CheckRecordHeaders(benchmark::State& state) {
  const Step step(int(state.range(0)));
  const Layout& l = step.layout;
  std::vector<RecordHeader> headers;
  std::vector<int> senders;
  for (int s = 0; s < l.world_size; ++s)
    for (int p = 0; p < step.recv_plan.count[size_t(s)]; ++p) {
      RecordHeader h;
      std::memcpy(&h, step.recv.data() + l.recv_record_offset(s, p, step.recv_plan.overflow_before[size_t(s)]), sizeof h);
      headers.push_back(h);
      senders.push_back(s);
    }
  for (auto _ : state) {
    int prev = -1, prev_sender = -1, bad = 0;
    for (size_t i = 0; i < headers.size(); ++i) {
      if (senders[i] != prev_sender) prev = -1;
      bad += check_record_header(l, headers[i], senders[i], prev) != nullptr;
      prev = headers[i].src_token;
      prev_sender = senders[i];
    }
    if (bad != 0) state.SkipWithError("a record the generator made failed its check");
    benchmark::DoNotOptimize(bad);
  }
  state.SetItemsProcessed(state.iterations() * int64_t(headers.size()));
}
BENCHMARK(BM_CheckRecordHeaders)->ArgName("ep")->Arg(8)->Arg(64);

}  // namespace
}  // namespace ferry::ep

BENCHMARK_MAIN();
