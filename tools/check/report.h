// The acceptance report: what every rank found (inventory), every check's verdict with its reason,
// the per-NIC link matrices and the all-to-all timings. Ranks build their part, rank 0 merges the
// parts and renders them as a terminal summary, JSON and a self-contained HTML page.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ferry::check {

enum class Verdict { pass, fail, skip };
const char* verdict_name(Verdict v);  // "PASS", "FAIL", "SKIP"
Verdict verdict_from_name(const std::string& name);

// One line of the summary: a stage ("inventory", "nic_loopback", "links", "alltoall", "nccl",
// "liveness") and the thing it judged ("host a: NIC count", "rank 1 fnic0 loopback", ...).
struct CheckResult {
  std::string stage;
  std::string name;
  Verdict verdict = Verdict::pass;
  std::string reason;        // why it failed or was skipped; empty on PASS
  nlohmann::json metrics = nlohmann::json::object();  // numbers that back the verdict
};

struct NicInfo {
  std::string name;          // libfabric domain name (interface name on tcp)
  std::string provider;      // as libfabric names it, e.g. "tcp;ofi_rxm"
  std::string fabric;
  double link_gbps = -1;     // -1: unknown
  std::string speed_source;  // "provider" (fi_info nic->link_attr), "sysfs", or ""
  std::string link_state;    // "up", "down" or "unknown" (provider link_attr, else sysfs carrier)
  std::string pci_bus_id;    // "" when unknown
  int numa_node = -1;
};

struct GpuInfo {
  int index = -1;
  std::string name;
  std::string pci_bus_id;
  int numa_node = -1;
};

struct RankInventory {
  int rank = 0;
  int local_rank = 0;
  int local_size = 1;
  std::string host;
  // FERRY_NODE_ID as this rank saw it ("" when unset): with --local-nodes the ranks of one machine
  // play several nodes, and the CUDA backend tells its IPC peers apart by it.
  std::string node_id;
  int pid = 0;
  int gpu = -1;                         // the GPU this rank drives; -1 for none
  std::vector<std::string> nics;        // NICs this rank uses, one per slot ("" = none for that slot)
  std::vector<std::string> missing_nics;  // requested NICs the provider does not list on this host
  std::string cores;                    // cores the rank will run on ("0-7")
  int numa_node = -1;
  std::vector<NicInfo> host_nics;       // every NIC the provider lists on this host
  std::vector<GpuInfo> host_gpus;
  std::string topology;                 // printable topology (hwloc) of the host, from local rank 0
  std::vector<std::string> nic_paths;   // PCIe path class from the GPU to each used NIC ("PIX".."SYS"; "" unknown)
  std::vector<std::string> near_nics;   // the host's NICs nearest to this rank's GPU
};

// One directed link measurement on one NIC slot.
struct LinkResult {
  int slot = 0;
  int src = 0;
  int dst = 0;
  std::string src_host, dst_host;
  std::string src_nic, dst_nic;
  bool ok = false;
  std::string error;          // why no number was measured
  double latency_us_p50 = -1;  // half round trip, measured by the lower rank of the pair
  double latency_us_p99 = -1;
  double gbps = -1;           // large-write bandwidth src -> dst
  bool slow = false;          // below --min-gbps or --outlier-ratio x median (set by rank 0)
  bool verified = false;      // the received bytes matched
};

struct AlltoallResult {
  std::string shape;          // "decode", "wide"
  std::string routing;        // "uniform", "skewed", "all_to_one"
  int num_tokens = 0;
  int hidden = 0;
  int top_k = 0;
  int num_experts = 0;
  std::string dtype;
  int iterations = 0;
  std::string device = "host";  // the backend that ran it: "host" or "cuda" (--a2a-device)
  bool ok = false;
  std::string error;
  uint64_t bytes_checked = 0;  // over all ranks
  // Worst rank's percentile (microseconds).
  double dispatch_us_p50 = -1, dispatch_us_p99 = -1;
  double combine_us_p50 = -1, combine_us_p99 = -1;
};

struct Report {
  std::string version;
  std::string started_utc;
  double duration_s = 0;
  std::string provider;
  int world_size = 0;
  std::vector<std::string> hosts;
  nlohmann::json options = nlohmann::json::object();  // the thresholds and sizes of this run
  std::vector<RankInventory> inventory;
  std::vector<CheckResult> checks;
  std::vector<LinkResult> links;
  std::vector<AlltoallResult> alltoall;

  bool passed() const;  // no FAIL and at least one PASS
  int count(Verdict v) const;
  void add(CheckResult c) { checks.push_back(std::move(c)); }
};

void to_json(nlohmann::json& j, const CheckResult& v);
void from_json(const nlohmann::json& j, CheckResult& v);
void to_json(nlohmann::json& j, const NicInfo& v);
void from_json(const nlohmann::json& j, NicInfo& v);
void to_json(nlohmann::json& j, const GpuInfo& v);
void from_json(const nlohmann::json& j, GpuInfo& v);
void to_json(nlohmann::json& j, const RankInventory& v);
void from_json(const nlohmann::json& j, RankInventory& v);
void to_json(nlohmann::json& j, const LinkResult& v);
void from_json(const nlohmann::json& j, LinkResult& v);
void to_json(nlohmann::json& j, const AlltoallResult& v);
void from_json(const nlohmann::json& j, AlltoallResult& v);

// The whole report, plus "matrices": per NIC slot, world x world bandwidth (Gbps, null where not
// measured) and latency (us) matrices, and "summary": counts per verdict and the overall result.
nlohmann::json report_to_json(const Report& r);
Report report_from_json(const nlohmann::json& j);

// Per slot: matrix[src][dst] in Gbps, -1 where not measured.
std::map<int, std::vector<std::vector<double>>> bandwidth_matrices(const Report& r);

// Per rank, the node it counts as: its node_id, or its host where that is unset.
std::vector<std::string> rank_nodes(const Report& r);
// "nodes: 2 (emulated on one machine, FERRY_NODE_ID): local-node-0: ranks 0-1; local-node-1: ranks
// 2-3"; empty when no rank has a node id (nodes are hosts, which the inventory shows already).
std::string nodes_line(const Report& r);

// Plain-text summary table (one row per check, FAIL reasons included) for the terminal.
std::string summary_table(const Report& r);
// The inventory as a terminal table.
std::string inventory_table(const Report& r);
// One self-contained page: inline CSS, no scripts or external resources.
std::string render_html(const Report& r);

}  // namespace ferry::check
