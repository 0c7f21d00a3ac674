#include "bench/ep/dry_run.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

#include "bench/ep/published.h"
#include "csrc/plan.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"

namespace ferry::bench {

using tools::format;
using tools::format_bytes;

namespace {

// log C(n, k), exact enough for the ratio of two binomials.
double log_choose(int n, int k) {
  if (k < 0 || k > n) return -INFINITY;
  return std::lgamma(n + 1.0) - std::lgamma(k + 1.0) - std::lgamma(n - k + 1.0);
}

// The dry run's numbers as (name, value) pairs, in the order the report prints them: one source for
// the JSON and the CSV.
std::vector<std::pair<std::string, double>> dry_run_quantities(const Options& o, const ferry_buffer_sizes_t& sizes,
                                                               const TrafficEstimate& t, int world) {
  const double layout_rows = double(sizes.num_local_experts) * sizes.max_rows_per_expert;
  const double per_expert_records = o.tokens * o.topk * double(world - 1) / world / o.dp_size;
  return {
      {"record_bytes", double(sizes.record_bytes)},
      {"dispatch_send_bytes", double(sizes.send_bytes)},
      {"dispatch_recv_bytes", double(sizes.recv_bytes)},
      {"combine_send_bytes", double(sizes.combine_send_bytes)},
      {"combine_recv_bytes", double(sizes.combine_recv_bytes)},
      {"total_registered_bytes", double(sizes.total_registered_bytes)},
      {"caller_expert_x_bytes", layout_rows * (double(o.hidden) * ep::elem_bytes_of(o.in_dtype) +
                                               (o.scale_block > 0 ? 4.0 * o.hidden / o.scale_block : 0.0))},
      {"caller_expert_y_bytes", layout_rows * o.hidden * ep::elem_bytes_of(o.out_dtype)},
      {"num_local_experts", double(sizes.num_local_experts)},
      {"max_rows_per_expert", double(sizes.max_rows_per_expert)},
      {"dests_per_token", t.dests_per_token},
      {"remote_dests_per_token", t.remote_dests_per_token},
      {"ferry_dispatch_records", t.ferry_dispatch_records},
      {"per_expert_dispatch_records", per_expert_records},
      {"ferry_dispatch_bytes", t.ferry_dispatch_bytes},
      {"per_expert_dispatch_bytes", t.per_expert_dispatch_bytes},
      {"ferry_combine_bytes", t.ferry_combine_bytes},
      {"per_expert_combine_bytes", t.per_expert_combine_bytes},
  };
}

nlohmann::json dry_run_config(const Options& o, int world) {
  return {{"preset", o.preset},        {"world_size", world},
          {"tokens", o.tokens},        {"hidden", o.hidden},
          {"topk", o.topk},            {"experts", o.experts},
          {"in_dtype", dtype_name(o.in_dtype)}, {"out_dtype", dtype_name(o.out_dtype)},
          {"scale_block", o.scale_block}, {"dp_size", o.dp_size},
          {"private_tokens", o.private_tokens}, {"expert_alignment", o.expert_alignment}};
}

void write_dry_run_json(const std::string& path, const Options& o, int world,
                        const std::vector<std::pair<std::string, double>>& q) {
  nlohmann::json j;
  j["tool"] = "ferry-bench";
  j["mode"] = "dry-run";
  j["config"] = dry_run_config(o, world);
  j["routing"] = "uniform (expected values)";
  for (const auto& [name, value] : q) j["quantities"][name] = value;
  std::ofstream f(path);
  if (!f) raise(Status::invalid_argument, "--json: cannot write '" + path + "'");
  f << j.dump(2) << "\n";
  if (!f) raise(Status::invalid_argument, "--json: writing '" + path + "' failed");
}

// One row per quantity, the config as leading columns (the shape ferry-bench's run CSV has).
void write_dry_run_csv(const std::string& path, const Options& o, int world,
                       const std::vector<std::pair<std::string, double>>& q) {
  const nlohmann::json config = dry_run_config(o, world);
  std::ofstream f(path);
  if (!f) raise(Status::invalid_argument, "--csv: cannot write '" + path + "'");
  for (auto it = config.begin(); it != config.end(); ++it) f << it.key() << ",";
  f << "quantity,value\n";
  for (const auto& [name, value] : q) {
    for (auto it = config.begin(); it != config.end(); ++it) f << (it->is_string() ? it->get<std::string>() : it->dump()) << ",";
    f << name << "," << format(value == std::floor(value) ? "%.0f" : "%.6g", value) << "\n";
  }
  if (!f) raise(Status::invalid_argument, "--csv: writing '" + path + "' failed");
}

}  // namespace

TrafficEstimate estimate_uniform_traffic(const Options& o, const ferry_buffer_sizes_t& sizes,
                                         int world_size) {
  TrafficEstimate t;
  const int experts_per_rank = o.experts / world_size;
  const double p_rank_missed =
      std::exp(log_choose(o.experts - experts_per_rank, o.topk) - log_choose(o.experts, o.topk));
  t.dests_per_token = world_size * (1.0 - p_rank_missed);
  t.remote_dests_per_token = (world_size - 1) * (1.0 - p_rank_missed);
  // With dp_size > 1 a group's tokens are split across its members, so each rank sends 1/dp of them.
  const double tokens = static_cast<double>(o.tokens) / o.dp_size;
  t.ferry_dispatch_records = tokens * t.remote_dests_per_token;
  const double count_header_bytes =
      static_cast<double>(ep::align_up(4ull * (world_size + experts_per_rank)));
  t.ferry_dispatch_bytes = t.ferry_dispatch_records * static_cast<double>(sizes.record_bytes) +
                           (world_size - 1) * count_header_bytes;
  const double partial_bytes =
      static_cast<double>(ep::align_up(uint64_t(o.hidden) * ep::elem_bytes_of(o.out_dtype)));
  t.ferry_combine_bytes = t.ferry_dispatch_records * partial_bytes;
  // A per-expert sender sends each (token, expert) pair whose expert is remote: payload + scales
  // + a 16-byte header (DeepEP low-latency's message layout), and gets one bf16 row back per pair.
  const double remote_routes = tokens * o.topk * (world_size - 1) / world_size;
  const double per_expert_msg = static_cast<double>(o.hidden) * ep::elem_bytes_of(o.in_dtype) +
                                (o.scale_block > 0 ? 4.0 * o.hidden / o.scale_block : 0.0) + 16.0;
  t.per_expert_dispatch_bytes = remote_routes * per_expert_msg;
  t.per_expert_combine_bytes = remote_routes * o.hidden * ep::elem_bytes_of(o.out_dtype);
  return t;
}

int run_dry_run(const Options& o) {
  const int world = o.dry_run_world_size > 0 ? o.dry_run_world_size : 8;
  if (auto msg = check_world_size(o, world); !msg.empty()) {
    std::fprintf(stderr, "ferry-bench: error: %s\n", msg.c_str());
    return 2;
  }
  const ferry_a2a_config_t config = make_a2a_config(o, 0, world);
  ferry_buffer_sizes_t sizes{};
  if (ferry_a2a_buffer_sizes(&config, &sizes) != FERRY_OK) {
    std::fprintf(stderr, "ferry-bench: error: invalid configuration: %s\n", ferry_last_error());
    return 2;
  }
  const TrafficEstimate t = estimate_uniform_traffic(o, sizes, world);

  std::printf("ferry-bench --dry-run: EP%d, %d tokens/rank, hidden %d, top-%d, %d experts "
              "(%d per rank), %s%s in, %s out, dp %d\n",
              world, o.tokens, o.hidden, o.topk, o.experts, o.experts / world, dtype_name(o.in_dtype),
              o.scale_block > 0 ? format(" + fp32 scale per %d", o.scale_block).c_str() : "",
              dtype_name(o.out_dtype), o.dp_size);
  std::printf("\nbuffer memory per rank (ferry_a2a_buffer_sizes)\n");
  tools::Table mem;
  mem.add_column("buffer", tools::Table::Align::left);
  mem.add_column("bytes");
  mem.add_column("size");
  auto ratio = [](double a, double b) { return b > 0 ? format("%.2f", a / b) : std::string("n/a"); };
  auto row = [&](const char* name, double bytes) {
    mem.add_row({name, format("%.0f", bytes), format_bytes(bytes)});
  };
  row("record (payload + scales + header)", static_cast<double>(sizes.record_bytes));
  row("dispatch send", static_cast<double>(sizes.send_bytes));
  row("dispatch receive", static_cast<double>(sizes.recv_bytes));
  row("combine send", static_cast<double>(sizes.combine_send_bytes));
  row("combine receive", static_cast<double>(sizes.combine_recv_bytes));
  row("total registered", static_cast<double>(sizes.total_registered_bytes));
  // The caller's side of the contract: the batched expert-major layout in and out of the experts.
  const double layout_rows = double(sizes.num_local_experts) * sizes.max_rows_per_expert;
  row("caller: out_expert_x + scales (batched layout)",
      layout_rows * (double(o.hidden) * ep::elem_bytes_of(o.in_dtype) +
                     (o.scale_block > 0 ? 4.0 * o.hidden / o.scale_block : 0.0)));
  row("caller: expert_y (batched layout)", layout_rows * o.hidden * ep::elem_bytes_of(o.out_dtype));
  mem.add_separator();
  mem.add_row({"reference: pplx-garden EP64 decode, per receive buffer", "",
               "~" + format_bytes(kPplxGardenEp64RecvBufferBytes)});
  mem.add_row({"reference: DeepEP low-latency EP64 decode, per GPU", "", "~1.9 GB"});
  mem.print(stdout);
  std::printf("  local experts %d, row capacity per expert %d\n", sizes.num_local_experts,
              sizes.max_rows_per_expert);

  std::printf("\nexpected traffic per rank per step, uniform routing (to other ranks)\n");
  std::printf("  distinct destination ranks per token: %.3f (%.3f remote) of top-%d\n",
              t.dests_per_token, t.remote_dests_per_token, o.topk);
  tools::Table traffic;
  traffic.add_column("step", tools::Table::Align::left);
  traffic.add_column("ferry (per rank)");
  traffic.add_column("per-expert sender (pplx-garden, DeepEP LL)");
  traffic.add_column("ferry / per-expert");
  traffic.add_row({"dispatch records", format("%.1f", t.ferry_dispatch_records),
                   format("%.1f", o.tokens * o.topk * double(world - 1) / world / o.dp_size),
                   ratio(t.ferry_dispatch_records, o.tokens * o.topk * double(world - 1) / world / o.dp_size)});
  traffic.add_row({"dispatch bytes", format_bytes(t.ferry_dispatch_bytes),
                   format_bytes(t.per_expert_dispatch_bytes),
                   ratio(t.ferry_dispatch_bytes, t.per_expert_dispatch_bytes)});
  traffic.add_row({"combine bytes", format_bytes(t.ferry_combine_bytes),
                   format_bytes(t.per_expert_combine_bytes),
                   ratio(t.ferry_combine_bytes, t.per_expert_combine_bytes)});
  traffic.print(stdout);
  const auto quantities = dry_run_quantities(o, sizes, t, world);
  try {
    if (!o.json_path.empty()) write_dry_run_json(o.json_path, o, world, quantities);
    if (!o.csv_path.empty()) write_dry_run_csv(o.csv_path, o, world, quantities);
  } catch (const Error& e) {
    std::fprintf(stderr, "ferry-bench: error: %s\n", e.what());
    return 2;
  }
  return 0;
}

}  // namespace ferry::bench
