#include "bench/ep/results.h"

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bench/ep/published.h"
#include "tools/common/launch.h"
#include "transfer_engine/error.h"
#include "transfer_engine/fabric/nic.h"

namespace ferry::bench {

using tools::format;
using nlohmann::json;

namespace {

const OpResult* find_op(const std::vector<OpResult>& ops, const std::string& name) {
  for (const auto& o : ops) if (o.name == name) return &o;
  return nullptr;
}

std::string shape_label(const Options& o) {
  std::string s = format("%d tokens/rank, hidden %d, top-%d, %d experts, %s", o.tokens, o.hidden, o.topk,
                         o.experts, dtype_name(o.in_dtype));
  if (o.scale_block > 0) s += format(" + f32 scale/%d", o.scale_block);
  s += format(" -> %s", dtype_name(o.out_dtype));
  if (o.dp_size > 1) s += format(", dp %d", o.dp_size);
  return s;
}

// Table cells must stay narrow: "pplx-garden, EFA (2x200G)" -> "pplx EFA".
const char* short_system_name(const std::string& system) {
  if (system.rfind("pplx-garden, EFA", 0) == 0) return "pplx EFA";
  if (system.rfind("pplx-garden, ConnectX", 0) == 0) return "pplx CX-7";
  if (system.rfind("DeepEP", 0) == 0) return "DeepEP-LL CX-7";
  if (system.rfind("UCCL-EP", 0) == 0) return "UCCL-EP EFA";
  return "other";
}

json stats_json(const OpResult& op) {
  const auto& p = op.latency_us;
  return json{{"samples", p.count},  {"min_us", p.min},  {"mean_us", p.mean},
              {"p50_us", p.p50},     {"p90_us", p.p90},  {"p99_us", p.p99},
              {"max_us", p.max},     {"bytes_per_rank", op.bytes_per_rank},
              {"gbps_per_rank_mean", op.gbps_per_rank_mean}, {"gbps_per_rank_min", op.gbps_per_rank_min},
              {"rank_p50_us", op.rank_p50_us}, {"rank_bytes", op.rank_bytes},
              {"step_p50_us", op.step_us.p50}, {"step_p99_us", op.step_us.p99},
              {"step_max_us", op.step_us.max}};
}

json config_json(const BenchResult& r) {
  const Options& o = r.options;
  return json{{"preset", o.preset},
              {"world_size", r.world_size},
              {"tokens", o.tokens},
              {"hidden", o.hidden},
              {"topk", o.topk},
              {"experts", o.experts},
              {"in_dtype", dtype_name(o.in_dtype)},
              {"out_dtype", dtype_name(o.out_dtype)},
              {"scale_block", o.scale_block},
              {"dp_size", o.dp_size},
              {"nets_per_rank", o.nets_per_rank},
              {"provider", r.provider},
              {"backend", backend_name(o.backend)},
              {"private_tokens", o.private_tokens},
              {"expert_alignment", o.expert_alignment},
              {"warmup", o.warmup},
              {"iters", o.iters},
              {"timeout_ms", o.timeout_ms},
              {"seed", o.seed},
              {"routing", routing_name(o.routing)},
              {"zipf_s", o.zipf_s},
              {"routing_file", o.routing_file},
              {"overlap", o.overlap_tbo ? "tbo" : o.overlap ? "gemm" : "none"},
              {"expert_intermediate", o.expert_intermediate},
              {"gemm_m", o.gemm_m},
              {"gemm_n", o.gemm_n},
              {"gemm_k", o.gemm_k},
              {"verify", o.verify},
              {"launcher", r.launcher},
              {"local_nodes", r.local_nodes}};
}

json environment_json(const BenchResult& r) {
  const auto& h = r.host;
  return json{{"hostname", h.hostname},         {"num_hosts", r.num_hosts},
              {"date_utc", h.date_utc},         {"provider", r.provider},
              {"nics", h.nics},                 {"gpus", h.gpus},
              {"cuda_driver", h.cuda_driver_version}, {"ferry_version", h.ferry_version},
              {"libfabric_version", h.libfabric_version}, {"hwloc_version", h.hwloc_version},
              {"cpu_model", h.cpu_model},       {"num_cpus", h.num_cpus},
              {"num_nodes", r.num_nodes},       {"nodes_note", nodes_note(r)},
              {"ferry_transport", ferry_transport(r)}, {"host_threads", r.host_threads},
              {"mpi_transport", r.baseline.empty() ? std::string() : mpi_transport_kind(r)}};
}

json transport_json(const BenchResult& r) {
  const MpiTransport& t = r.mpi_transport;
  const bool one_host = r.num_hosts == 1;
  return json{{"kind", mpi_transport_kind(r)},
              {"description", t.describe(one_host)},
              {"library", t.library},
              {"btl", one_host ? t.same_host_btl : t.other_host_btl},
              {"btl_selection", t.btl_selection},
              {"pml_selection", t.pml_selection},
              {"registered_btls", t.btls},
              {"chosen_by", r.mpi_transport_chooser},
              {"matches_provider", transport_matches(r.provider, mpi_transport_kind(r))}};
}

}  // namespace

std::string ferry_transport(const BenchResult& r) {
  return "libfabric " + r.provider + " (" + te::fabric::libfabric_provider_name(r.provider) + ")";
}

std::string mpi_transport_kind(const BenchResult& r) { return r.mpi_transport.kind(r.num_hosts == 1); }

std::string nodes_note(const BenchResult& r) {
  if (!r.node_ids_set) return "host names";
  std::string note;
  if (r.node_ids_from_user) {
    note = "FERRY_NODE_ID from the environment";
    if (r.local_nodes > 0) note += format(", which wins over --local-nodes %d", r.local_nodes);
  } else {
    note = r.num_hosts == 1 ? "emulated on one machine, FERRY_NODE_ID"
                            : format("emulated on %d hosts, FERRY_NODE_ID", r.num_hosts);
  }
  return note;
}

namespace {

void print_tbo(const TboResult& tbo, std::FILE* out) {
  std::fprintf(out, "\n  MoE layer (--overlap tbo): bf16 dispatch, SwiGLU experts %d wide, grouped GEMM: %s; handles:",
               tbo.intermediate, tbo.gemm.c_str());
  for (size_t b = 0; b < tbo.handle_bytes.size(); ++b)
    std::fprintf(out, "%s %s", b ? "," : "", tools::format_bytes(double(tbo.handle_bytes[b])).c_str());
  std::fprintf(out, " registered%s\n", tbo.verified ? "; verify: every token of both schedules PASSED" : "");
  tools::Table t;
  t.add_column("schedule", tools::Table::Align::left);
  t.add_column("ops", tools::Table::Align::left);
  for (const char* c : {"transfer us", "GEMM us", "step us", "step p90 us", "hidden"}) t.add_column(c);
  for (const TboSchedule& s : tbo.schedules) {
    t.add_row({s.name, s.ops, format("%.1f", s.transfer_us.p50), format("%.1f", s.gemm_us.p50),
               format("%.1f", s.step_us.p50), format("%.1f", s.step_us.p90), format("%.2f", s.hidden_fraction)});
  }
  t.print(out);
  std::fprintf(out, "  per step: the slowest rank's time, p50 over iterations; transfer: the schedule without its GEMMs, "
               "GEMM: its GEMMs alone; hidden = 1 - (step - GEMM) / transfer (plain hides nothing: the control)\n");
}

}  // namespace

void print_table(const BenchResult& r, std::FILE* out) {
  const Options& o = r.options;
  std::fprintf(out, "ferry-bench  EP%d  %s\n", r.world_size, shape_label(o).c_str());
  std::fprintf(out, "  backend %s, provider %s, %d NIC(s)/rank, %d rank(s) on %d host(s), launcher %s, "
               "routing %s, %d warm-up + %d timed iterations\n",
               backend_name(o.backend), r.provider.c_str(), o.nets_per_rank, r.world_size, r.num_hosts,
               r.launcher.c_str(), routing_name(o.routing), o.warmup, o.iters);
  if (r.host_threads > 0)
    std::fprintf(out, "  host backend: %d thread(s) per rank pack and sum (%s)\n", r.host_threads,
                 std::getenv("FERRY_HOST_THREADS") ? "FERRY_HOST_THREADS" : "this rank's share of the CPUs, less the caller and the engine's worker");
  if (!r.baseline.empty()) {
    std::fprintf(out, "  transports: ferry over %s; MPI over %s, chosen by %s\n", ferry_transport(r).c_str(),
                 r.mpi_transport.describe(r.num_hosts == 1).c_str(), r.mpi_transport_chooser.c_str());
    if (!transport_matches(r.provider, mpi_transport_kind(r))) {
      std::fprintf(out, "  WARNING: MPI ran over %s, ferry over %s: ferry/MPI compares two transports (ferry-bench's "
                   "own mpirun launch picks the matching one unless OMPI_MCA_btl is set)\n",
                   mpi_transport_kind(r).c_str(), r.provider.c_str());
    }
  }
  if (r.node_ids_set) {
    std::fprintf(out, "  nodes: %d (%s): %s\n", r.num_nodes, nodes_note(r).c_str(),
                 tools::describe_rank_nodes(r.rank_nodes).c_str());
  }
  std::fprintf(out, "  buffers per rank: %s registered (dispatch recv %s, record %llu B)\n",
               tools::format_bytes(double(r.sizes.total_registered_bytes)).c_str(),
               tools::format_bytes(double(r.sizes.recv_bytes)).c_str(),
               static_cast<unsigned long long>(r.sizes.record_bytes));
  if (r.verify_requested) {
    std::fprintf(out, "  verify: %s\n", r.verify_passed ? "passed (every byte of dispatch, combine within tolerance, all ranks)"
                                                         : "FAILED");
  }
  std::fprintf(out, "\n");

  const auto published = o.compare ? published_for(o, r.world_size) : std::vector<PublishedFigure>{};
  tools::Table t;
  t.add_column("operation", tools::Table::Align::left);
  for (const char* c : {"p50 us", "p90 us", "p99 us", "max us", "step p50 us", "bytes/rank", "GB/s/rank"}) {
    t.add_column(c);
  }
  const bool baseline = !r.baseline.empty();
  if (baseline) {
    t.add_column("MPI p50 us");
    t.add_column("ferry/MPI");
  }
  if (o.compare) t.add_column("published, other hardware (us)", tools::Table::Align::left);
  auto add = [&](const OpResult& op, const char* label) {
    std::vector<std::string> cells{label,
                                   format("%.1f", op.latency_us.p50),
                                   format("%.1f", op.latency_us.p90),
                                   format("%.1f", op.latency_us.p99),
                                   format("%.1f", op.latency_us.max),
                                   format("%.1f", op.step_us.p50),
                                   op.bytes_per_rank > 0 ? tools::format_bytes(op.bytes_per_rank) : "",
                                   op.bytes_per_rank > 0 ? format(op.gbps_per_rank_mean < 0.1 ? "%.4f" : "%.2f", op.gbps_per_rank_mean) : ""};
    if (baseline) {
      const OpResult* b = find_op(r.baseline, op.name);
      cells.push_back(b ? format("%.1f", b->latency_us.p50) : "");
      cells.push_back(b && b->latency_us.p50 > 0 ? format("%.2f", op.latency_us.p50 / b->latency_us.p50) : "");
    }
    if (o.compare) {
      std::string s;
      for (const auto& f : published) {
        const double v = op.name == "dispatch" ? f.dispatch_us : op.name == "combine" ? f.combine_us : -1;
        if (v < 0) continue;
        s += (s.empty() ? "" : " | ") + format("%s %.1f", short_system_name(f.system), v);
      }
      cells.push_back(s);
    }
    t.add_row(cells);
  };
  const std::pair<const char*, const char*> rows[] = {
      {"dispatch", "dispatch"},          {"combine", "combine"},
      {"dispatch_send", "dispatch SEND"}, {"dispatch_recv", "dispatch RECV"},
      {"combine_send", "combine SEND"},   {"combine_recv", "combine RECV"}};
  for (const auto& [name, label] : rows) {
    if (const OpResult* op = find_op(r.ferry, name)) add(*op, label);
    if (std::string(name) == "combine") t.add_separator();
  }
  if (r.overlap) {
    t.add_separator();
    add(r.overlap->dispatch_overlapped, "dispatch SEND+GEMM+RECV");
    add(r.overlap->combine_overlapped, "combine SEND+GEMM+RECV");
  }
  t.print(out);
  std::fprintf(out, "  p50/p90/p99/max over all ranks' samples (%zu per operation); step p50: the slowest rank "
               "of each iteration; GB/s/rank = bytes sent by the rank over the network / its p50.\n",
               r.ferry.empty() ? size_t(0) : r.ferry.front().latency_us.count);
  if (baseline) {
    std::fprintf(out, "  baseline: MPI_Alltoall of counts + MPI_Alltoallv of the same records (and partials "
                 "back), timed the same way; ferry/MPI < 1 means ferry is faster.\n");
  } else {
    std::fprintf(out, "  baseline: none (%s)\n", r.baseline_note.c_str());
  }
  if (r.overlap) {
    const auto& ov = r.overlap.value();
    std::fprintf(out, "  overlap: GEMM %dx%dx%d alone %.1f us (%.2f GFLOP/s); hidden share of SEND+RECV: "
                 "dispatch %.0f%%, combine %.0f%%\n",
                 ov.gemm_m, ov.gemm_n, ov.gemm_k, ov.gemm_alone_us,
                 ov.gemm_alone_us > 0 ? ov.gemm_flops / ov.gemm_alone_us / 1e3 : 0.0,
                 100 * ov.dispatch_hidden_fraction, 100 * ov.combine_hidden_fraction);
  }
  if (r.overlap_tbo) print_tbo(*r.overlap_tbo, out);
  if (o.compare) {
    if (published.empty()) {
      std::fprintf(out, "  published figures: none for EP%d with this shape (published: decode = 128 "
                   "tokens/rank, hidden 7168, top-8, 256 experts, fp8 -> bf16; prefill = 4096 tokens/rank; "
                   "EP8..EP64)\n", r.world_size);
    } else {
      std::fprintf(out, "\n  published, other hardware (EP%d, same shape; dispatch / combine us):\n", r.world_size);
      for (const auto& f : published) {
        std::fprintf(out, "    %-28s %8.1f / %-8.1f  ferry here: %.2fx / %.2fx\n", f.system, f.dispatch_us,
                     f.combine_us,
                     find_op(r.ferry, "dispatch") ? find_op(r.ferry, "dispatch")->latency_us.p50 / f.dispatch_us : 0,
                     find_op(r.ferry, "combine") ? find_op(r.ferry, "combine")->latency_us.p50 / f.combine_us : 0);
      }
    }
  }
  std::fflush(out);
}

void write_json(const BenchResult& r, const std::string& path) {
  json j;
  j["tool"] = "ferry-bench";
  j["config"] = config_json(r);
  j["environment"] = environment_json(r);
  // JSON only: one column per rank would not fit the CSV's one-row-per-operation shape.
  j["environment"]["rank_nodes"] = r.rank_nodes;
  j["buffer_sizes"] = json{{"record_bytes", r.sizes.record_bytes},
                           {"send_bytes", r.sizes.send_bytes},
                           {"recv_bytes", r.sizes.recv_bytes},
                           {"combine_send_bytes", r.sizes.combine_send_bytes},
                           {"combine_recv_bytes", r.sizes.combine_recv_bytes},
                           {"total_registered_bytes", r.sizes.total_registered_bytes},
                           {"max_rows_per_expert", r.sizes.max_rows_per_expert},
                           {"num_local_experts", r.sizes.num_local_experts}};
  json results = json::object();
  for (const auto& op : r.ferry) results[op.name] = stats_json(op);
  j["results"] = results;
  json baseline = json::object();
  baseline["kind"] = r.baseline_kind.empty() ? json(nullptr) : json(r.baseline_kind);
  baseline["note"] = r.baseline_note;
  baseline["transport"] = r.baseline.empty() ? json(nullptr) : transport_json(r);
  for (const auto& op : r.baseline) {
    baseline[op.name] = stats_json(op);
    if (const OpResult* f = find_op(r.ferry, op.name); f && op.latency_us.p50 > 0) {
      baseline["ratio_p50"][op.name] = f->latency_us.p50 / op.latency_us.p50;
    }
  }
  j["baseline"] = baseline;
  if (r.overlap) {
    const auto& ov = r.overlap.value();
    j["overlap"] = json{{"gemm_m", ov.gemm_m}, {"gemm_n", ov.gemm_n}, {"gemm_k", ov.gemm_k},
                        {"gemm_alone_p50_us", ov.gemm_alone_us},
                        {"dispatch_overlapped", stats_json(ov.dispatch_overlapped)},
                        {"combine_overlapped", stats_json(ov.combine_overlapped)},
                        {"dispatch_hidden_fraction", ov.dispatch_hidden_fraction},
                        {"combine_hidden_fraction", ov.combine_hidden_fraction}};
  } else {
    j["overlap"] = nullptr;
  }
  if (r.overlap_tbo) {
    const TboResult& tbo = *r.overlap_tbo;
    json schedules = json::array();
    auto pct = [](const tools::Percentiles& p) {
      return json{{"min_us", p.min}, {"p50_us", p.p50}, {"p90_us", p.p90}, {"max_us", p.max}};
    };
    for (const TboSchedule& sch : tbo.schedules) {
      schedules.push_back(json{{"name", sch.name}, {"ops", sch.ops}, {"transfer", pct(sch.transfer_us)},
                               {"gemm", pct(sch.gemm_us)}, {"step", pct(sch.step_us)},
                               {"hidden_fraction", sch.hidden_fraction}});
    }
    j["overlap_tbo"] = json{{"expert_intermediate", tbo.intermediate}, {"grouped_gemm", tbo.gemm},
                            {"handle_registered_bytes", tbo.handle_bytes}, {"schedules", schedules},
                            {"verified", tbo.verified}};
  } else {
    j["overlap_tbo"] = nullptr;
  }
  j["verify"] = json{{"requested", r.verify_requested}, {"passed", r.verify_passed},
                     {"failed_ranks", r.verify_failed_ranks}};
  json pub = json::array();
  for (const auto& f : published_for(r.options, r.world_size)) {
    pub.push_back(json{{"system", f.system}, {"shape", f.shape}, {"ep_size", f.ep_size},
                       {"dispatch_us", f.dispatch_us}, {"combine_us", f.combine_us},
                       {"note", "published, other hardware"}});
  }
  j["published"] = pub;
  j["wall_seconds"] = r.wall_seconds;
  std::ofstream f(path);
  if (!f) raise(Status::invalid_argument, "--json: cannot write '" + path + "'");
  f << j.dump(2) << "\n";
  if (!f) raise(Status::invalid_argument, "--json: writing '" + path + "' failed");
}

void write_csv(const BenchResult& r, const std::string& path) {
  std::ofstream f(path);
  if (!f) raise(Status::invalid_argument, "--csv: cannot write '" + path + "'");
  const json config = config_json(r);
  const json env = environment_json(r);
  auto cell = [](const json& v) {
    std::string s = v.is_string() ? v.get<std::string>() : v.dump();
    if (s.find_first_of(",\"\n") != std::string::npos) {
      std::string q = "\"";
      for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
      return q + "\"";
    }
    return s;
  };
  std::vector<std::string> header;
  for (auto it = config.begin(); it != config.end(); ++it) header.push_back(it.key());
  for (auto it = env.begin(); it != env.end(); ++it) header.push_back("env_" + it.key());
  for (const char* c : {"impl", "operation", "samples", "min_us", "mean_us", "p50_us", "p90_us", "p99_us",
                        "max_us", "step_p50_us", "step_p99_us", "bytes_per_rank", "gbps_per_rank_mean", "gbps_per_rank_min",
                        "ratio_to_baseline_p50", "verify_passed"}) {
    header.push_back(c);
  }
  for (size_t i = 0; i < header.size(); ++i) f << (i ? "," : "") << header[i];
  f << "\n";
  auto row = [&](const char* impl, const OpResult& op, double ratio) {
    bool first = true;
    auto put = [&](const std::string& s) {
      f << (first ? "" : ",") << s;
      first = false;
    };
    for (auto it = config.begin(); it != config.end(); ++it) put(cell(*it));
    for (auto it = env.begin(); it != env.end(); ++it) put(cell(*it));
    const auto& p = op.latency_us;
    put(impl);
    put(op.name);
    put(std::to_string(p.count));
    for (double v : {p.min, p.mean, p.p50, p.p90, p.p99, p.max, op.step_us.p50, op.step_us.p99, op.bytes_per_rank,
                     op.gbps_per_rank_mean,
                     op.gbps_per_rank_min}) {
      put(format("%.3f", v));
    }
    put(ratio > 0 ? format("%.4f", ratio) : "");
    put(r.verify_requested ? (r.verify_passed ? "true" : "false") : "");
    f << "\n";
  };
  for (const auto& op : r.ferry) {
    const OpResult* b = find_op(r.baseline, op.name);
    row("ferry", op, b && b->latency_us.p50 > 0 ? op.latency_us.p50 / b->latency_us.p50 : 0);
  }
  for (const auto& op : r.baseline) row(r.baseline_kind.c_str(), op, 0);
  if (r.overlap) {
    row("ferry", r.overlap->dispatch_overlapped, 0);
    row("ferry", r.overlap->combine_overlapped, 0);
  }
  if (!f) raise(Status::invalid_argument, "--csv: writing '" + path + "' failed");
}

}  // namespace ferry::bench
