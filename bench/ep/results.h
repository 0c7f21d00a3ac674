// What one ferry-bench run measured, and its three renderings: the table on stdout, --json, --csv.
#pragma once
#include <optional>
#include <string>
#include <vector>

#include "bench/ep/mpi_baseline.h"
#include "bench/ep/options.h"
#include "bench/ep/tbo.h"
#include "ferry/ferry.h"
#include "tools/common/env.h"
#include "tools/common/report.h"

namespace ferry::bench {

struct OpResult {
  std::string name;                  // "dispatch", "combine", "dispatch_send", ...
  tools::Percentiles latency_us;     // over every rank's timed samples
  // Per iteration the slowest rank's time (a step is done when its last rank is): percentiles over
  // iterations.
  tools::Percentiles step_us;
  std::vector<double> rank_p50_us;   // per rank
  std::vector<double> rank_bytes;    // per rank, mean bytes sent per call (0: not measured)
  double bytes_per_rank = 0;         // mean over ranks
  double gbps_per_rank_mean = 0;     // bytes / p50 per rank, averaged; 0 when no bytes
  double gbps_per_rank_min = 0;
};

struct OverlapResult {
  double gemm_alone_us = 0;          // p50
  double gemm_flops = 0;
  int gemm_m = 0, gemm_n = 0, gemm_k = 0;
  // Per step: p50 of SEND + GEMM + RECV in one go, and the fraction of SEND + RECV it hid:
  // (t_send + t_recv + t_gemm_alone - t_overlapped) / (t_send + t_recv).
  OpResult dispatch_overlapped, combine_overlapped;
  double dispatch_hidden_fraction = 0;
  double combine_hidden_fraction = 0;
};

struct BenchResult {
  Options options;
  int world_size = 1;
  int num_hosts = 1;
  std::string launcher;              // how the ranks were started
  // Nodes as the CUDA backend tells them apart: per rank FERRY_NODE_ID, or the host name where it is
  // unset. --local-nodes sets FERRY_NODE_ID so that one machine plays several nodes.
  int local_nodes = 0;               // --local-nodes of the launch (0: none)
  std::vector<std::string> rank_nodes;
  int num_nodes = 1;                 // distinct rank_nodes
  bool node_ids_set = false;         // some rank has FERRY_NODE_ID
  bool node_ids_from_user = false;   // rank 0's FERRY_NODE_ID was in the environment already
  std::string provider;              // requested libfabric provider
  int host_threads = 0;              // host backend: threads per rank for packing and sums (rank 0's)
  tools::HostInfo host;              // rank 0's
  ferry_buffer_sizes_t sizes{};
  std::vector<OpResult> ferry;       // dispatch, combine, dispatch_send, dispatch_recv, combine_send, combine_recv
  std::string baseline_kind;         // "mpi" or "" (none)
  std::string baseline_note;         // why there is none
  std::vector<OpResult> baseline;    // dispatch, combine
  MpiTransport mpi_transport;        // what the baseline ran on, read back from MPI (rank 0's)
  std::string mpi_transport_chooser; // who chose it (mpi_transport_chooser())
  std::optional<OverlapResult> overlap;
  std::optional<TboResult> overlap_tbo;  // --overlap tbo
  bool verify_requested = false;
  bool verify_passed = false;
  std::vector<int> verify_failed_ranks;
  double wall_seconds = 0;
};

// How the node count was made: "emulated on one machine, FERRY_NODE_ID", "FERRY_NODE_ID from the
// environment", "host names".
std::string nodes_note(const BenchResult& r);

// ferry's side of the comparison: "libfabric tcp (tcp;ofi_rxm)".
std::string ferry_transport(const BenchResult& r);
// MPI's side: "tcp", "shared memory", ... for the hosts of this run.
std::string mpi_transport_kind(const BenchResult& r);

void print_table(const BenchResult& r, std::FILE* out);
// Throws ferry::Error(Status::invalid_argument) naming the path when it cannot be written.
void write_json(const BenchResult& r, const std::string& path);
void write_csv(const BenchResult& r, const std::string& path);

}  // namespace ferry::bench
