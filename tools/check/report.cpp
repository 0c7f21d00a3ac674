#include "tools/check/report.h"

#include <algorithm>
#include <set>
#include <sstream>
#include <stdexcept>

#include "tools/common/launch.h"

namespace ferry::check {

using nlohmann::json;

const char* verdict_name(Verdict v) {
  switch (v) {
    case Verdict::pass: return "PASS";
    case Verdict::fail: return "FAIL";
    case Verdict::skip: return "SKIP";
  }
  return "FAIL";
}

Verdict verdict_from_name(const std::string& name) {
  if (name == "PASS") return Verdict::pass;
  if (name == "SKIP") return Verdict::skip;
  if (name == "FAIL") return Verdict::fail;
  throw std::invalid_argument("unknown verdict '" + name + "' (expected PASS, FAIL or SKIP)");
}

bool Report::passed() const { return count(Verdict::fail) == 0 && count(Verdict::pass) > 0; }

int Report::count(Verdict v) const {
  return int(std::count_if(checks.begin(), checks.end(), [v](const CheckResult& c) { return c.verdict == v; }));
}

// Numbers that were never measured are -1 in memory and null in JSON, so a reader cannot mistake
// them for a measurement.
static json number_or_null(double v) { return v < 0 ? json(nullptr) : json(v); }
static double number_from(const json& j, const char* key) {
  if (!j.contains(key) || j.at(key).is_null()) return -1;
  return j.at(key).get<double>();
}

void to_json(json& j, const CheckResult& v) {
  j = json{{"stage", v.stage}, {"name", v.name}, {"verdict", verdict_name(v.verdict)},
           {"reason", v.reason}, {"metrics", v.metrics}};
}
void from_json(const json& j, CheckResult& v) {
  v.stage = j.at("stage").get<std::string>();
  v.name = j.at("name").get<std::string>();
  v.verdict = verdict_from_name(j.at("verdict").get<std::string>());
  v.reason = j.value("reason", "");
  v.metrics = j.value("metrics", json::object());
}

void to_json(json& j, const NicInfo& v) {
  j = json{{"name", v.name}, {"provider", v.provider}, {"fabric", v.fabric},
           {"link_gbps", number_or_null(v.link_gbps)}, {"speed_source", v.speed_source}, {"link_state", v.link_state},
           {"pci_bus_id", v.pci_bus_id}, {"numa_node", v.numa_node}};
}
void from_json(const json& j, NicInfo& v) {
  v.name = j.at("name").get<std::string>();
  v.provider = j.value("provider", "");
  v.fabric = j.value("fabric", "");
  v.link_gbps = number_from(j, "link_gbps");
  v.speed_source = j.value("speed_source", "");
  v.link_state = j.value("link_state", "unknown");
  v.pci_bus_id = j.value("pci_bus_id", "");
  v.numa_node = j.value("numa_node", -1);
}

void to_json(json& j, const GpuInfo& v) {
  j = json{{"index", v.index}, {"name", v.name}, {"pci_bus_id", v.pci_bus_id}, {"numa_node", v.numa_node}};
}
void from_json(const json& j, GpuInfo& v) {
  v.index = j.value("index", -1);
  v.name = j.value("name", "");
  v.pci_bus_id = j.value("pci_bus_id", "");
  v.numa_node = j.value("numa_node", -1);
}

void to_json(json& j, const RankInventory& v) {
  j = json{{"rank", v.rank}, {"local_rank", v.local_rank}, {"local_size", v.local_size},
           {"host", v.host}, {"node_id", v.node_id}, {"pid", v.pid}, {"gpu", v.gpu}, {"nics", v.nics},
           {"missing_nics", v.missing_nics}, {"cores", v.cores}, {"numa_node", v.numa_node},
           {"host_nics", v.host_nics}, {"host_gpus", v.host_gpus}, {"topology", v.topology},
           {"nic_paths", v.nic_paths}, {"near_nics", v.near_nics}};
}
void from_json(const json& j, RankInventory& v) {
  v.rank = j.at("rank").get<int>();
  v.local_rank = j.value("local_rank", 0);
  v.local_size = j.value("local_size", 1);
  v.host = j.value("host", "");
  v.node_id = j.value("node_id", "");
  v.pid = j.value("pid", 0);
  v.gpu = j.value("gpu", -1);
  v.nics = j.value("nics", std::vector<std::string>{});
  v.missing_nics = j.value("missing_nics", std::vector<std::string>{});
  v.cores = j.value("cores", "");
  v.numa_node = j.value("numa_node", -1);
  v.host_nics = j.value("host_nics", std::vector<NicInfo>{});
  v.host_gpus = j.value("host_gpus", std::vector<GpuInfo>{});
  v.topology = j.value("topology", "");
  v.nic_paths = j.value("nic_paths", std::vector<std::string>{});
  v.near_nics = j.value("near_nics", std::vector<std::string>{});
}

void to_json(json& j, const LinkResult& v) {
  j = json{{"slot", v.slot}, {"src", v.src}, {"dst", v.dst}, {"src_host", v.src_host},
           {"dst_host", v.dst_host}, {"src_nic", v.src_nic}, {"dst_nic", v.dst_nic}, {"ok", v.ok},
           {"error", v.error}, {"latency_us_p50", number_or_null(v.latency_us_p50)},
           {"latency_us_p99", number_or_null(v.latency_us_p99)}, {"gbps", number_or_null(v.gbps)},
           {"slow", v.slow}, {"verified", v.verified}};
}
void from_json(const json& j, LinkResult& v) {
  v.slot = j.at("slot").get<int>();
  v.src = j.at("src").get<int>();
  v.dst = j.at("dst").get<int>();
  v.src_host = j.value("src_host", "");
  v.dst_host = j.value("dst_host", "");
  v.src_nic = j.value("src_nic", "");
  v.dst_nic = j.value("dst_nic", "");
  v.ok = j.value("ok", false);
  v.error = j.value("error", "");
  v.latency_us_p50 = number_from(j, "latency_us_p50");
  v.latency_us_p99 = number_from(j, "latency_us_p99");
  v.gbps = number_from(j, "gbps");
  v.slow = j.value("slow", false);
  v.verified = j.value("verified", false);
}

void to_json(json& j, const AlltoallResult& v) {
  j = json{{"shape", v.shape}, {"routing", v.routing}, {"num_tokens", v.num_tokens},
           {"hidden", v.hidden}, {"top_k", v.top_k}, {"num_experts", v.num_experts},
           {"dtype", v.dtype}, {"iterations", v.iterations}, {"device", v.device}, {"ok", v.ok}, {"error", v.error},
           {"bytes_checked", v.bytes_checked},
           {"dispatch_us_p50", number_or_null(v.dispatch_us_p50)},
           {"dispatch_us_p99", number_or_null(v.dispatch_us_p99)},
           {"combine_us_p50", number_or_null(v.combine_us_p50)},
           {"combine_us_p99", number_or_null(v.combine_us_p99)}};
}
void from_json(const json& j, AlltoallResult& v) {
  v.shape = j.at("shape").get<std::string>();
  v.routing = j.at("routing").get<std::string>();
  v.num_tokens = j.value("num_tokens", 0);
  v.hidden = j.value("hidden", 0);
  v.top_k = j.value("top_k", 0);
  v.num_experts = j.value("num_experts", 0);
  v.dtype = j.value("dtype", "");
  v.iterations = j.value("iterations", 0);
  v.device = j.value("device", "host");  // reports from before --a2a-device ran on the host
  v.ok = j.value("ok", false);
  v.error = j.value("error", "");
  v.bytes_checked = j.value("bytes_checked", uint64_t(0));
  v.dispatch_us_p50 = number_from(j, "dispatch_us_p50");
  v.dispatch_us_p99 = number_from(j, "dispatch_us_p99");
  v.combine_us_p50 = number_from(j, "combine_us_p50");
  v.combine_us_p99 = number_from(j, "combine_us_p99");
}

std::map<int, std::vector<std::vector<double>>> bandwidth_matrices(const Report& r) {
  std::map<int, std::vector<std::vector<double>>> out;
  const int n = r.world_size;
  for (const LinkResult& l : r.links) {
    auto& m = out[l.slot];
    if (m.empty()) m.assign(n, std::vector<double>(n, -1));
    if (l.src >= 0 && l.src < n && l.dst >= 0 && l.dst < n) m[l.src][l.dst] = l.gbps;
  }
  return out;
}

json report_to_json(const Report& r) {
  json j;
  j["version"] = r.version;
  j["started_utc"] = r.started_utc;
  j["duration_s"] = r.duration_s;
  j["provider"] = r.provider;
  j["world_size"] = r.world_size;
  j["hosts"] = r.hosts;
  {
    std::vector<std::string> nodes;
    for (const std::string& n : rank_nodes(r))
      if (std::find(nodes.begin(), nodes.end(), n) == nodes.end()) nodes.push_back(n);
    j["nodes"] = nodes;
    j["nodes_note"] = nodes_line(r);
  }
  j["options"] = r.options;
  j["inventory"] = r.inventory;
  j["checks"] = r.checks;
  j["links"] = r.links;
  j["alltoall"] = r.alltoall;
  json matrices = json::object();
  const int n = r.world_size;
  std::map<int, std::vector<std::vector<double>>> lat;
  for (const LinkResult& l : r.links) {
    auto& m = lat[l.slot];
    if (m.empty()) m.assign(n, std::vector<double>(n, -1));
    if (l.src >= 0 && l.src < n && l.dst >= 0 && l.dst < n) m[l.src][l.dst] = l.latency_us_p50;
  }
  for (const auto& [slot, bw] : bandwidth_matrices(r)) {
    json s;
    s["slot"] = slot;
    json gb = json::array(), us = json::array();
    for (int a = 0; a < n; ++a) {
      json rg = json::array(), ru = json::array();
      for (int b = 0; b < n; ++b) {
        rg.push_back(number_or_null(bw[a][b]));
        ru.push_back(number_or_null(lat[slot][a][b]));
      }
      gb.push_back(rg);
      us.push_back(ru);
    }
    s["gbps"] = gb;
    s["latency_us"] = us;
    matrices[std::to_string(slot)] = s;
  }
  j["matrices"] = matrices;
  j["summary"] = {{"pass", r.count(Verdict::pass)},
                  {"fail", r.count(Verdict::fail)},
                  {"skip", r.count(Verdict::skip)},
                  {"result", r.passed() ? "PASS" : "FAIL"}};
  return j;
}

Report report_from_json(const json& j) {
  Report r;
  r.version = j.value("version", "");
  r.started_utc = j.value("started_utc", "");
  r.duration_s = j.value("duration_s", 0.0);
  r.provider = j.value("provider", "");
  r.world_size = j.value("world_size", 0);
  r.hosts = j.value("hosts", std::vector<std::string>{});
  r.options = j.value("options", json::object());
  r.inventory = j.value("inventory", std::vector<RankInventory>{});
  r.checks = j.value("checks", std::vector<CheckResult>{});
  r.links = j.value("links", std::vector<LinkResult>{});
  r.alltoall = j.value("alltoall", std::vector<AlltoallResult>{});
  return r;
}

// Columns sized to their widest cell; the last column is not padded so long reasons stay readable.
static std::string text_table(const std::vector<std::string>& header,
                              const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> width(header.size());
  for (size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
  for (const auto& row : rows)
    for (size_t c = 0; c < row.size() && c < width.size(); ++c) width[c] = std::max(width[c], row[c].size());
  std::ostringstream out;
  auto line = [&](const std::vector<std::string>& row) {
    for (size_t c = 0; c < header.size(); ++c) {
      const std::string cell = c < row.size() ? row[c] : "";
      out << cell;
      if (c + 1 < header.size()) out << std::string(width[c] - cell.size() + 2, ' ');
    }
    out << '\n';
  };
  line(header);
  size_t total = 0;
  for (size_t w : width) total += w + 2;
  out << std::string(std::min<size_t>(total, 120), '-') << '\n';
  for (const auto& row : rows) line(row);
  return out.str();
}

std::string summary_table(const Report& r) {
  std::vector<std::vector<std::string>> rows;
  for (const CheckResult& c : r.checks) rows.push_back({c.stage, c.name, verdict_name(c.verdict), c.reason});
  std::ostringstream out;
  out << text_table({"stage", "check", "result", "reason"}, rows);
  out << "\n" << r.count(Verdict::pass) << " passed, " << r.count(Verdict::fail) << " failed, "
      << r.count(Verdict::skip) << " skipped: " << (r.passed() ? "PASS" : "FAIL") << '\n';
  return out.str();
}

static std::string join(const std::vector<std::string>& v, const char* sep = ",") {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? sep : "") + (v[i].empty() ? std::string("-") : v[i]);
  return s;
}

std::vector<std::string> rank_nodes(const Report& r) {
  std::vector<std::string> out;
  for (const RankInventory& inv : r.inventory) out.push_back(inv.node_id.empty() ? inv.host : inv.node_id);
  return out;
}

std::string nodes_line(const Report& r) {
  const bool any_node_id = std::any_of(r.inventory.begin(), r.inventory.end(),
                                       [](const RankInventory& inv) { return !inv.node_id.empty(); });
  if (!any_node_id) return {};
  const std::vector<std::string> nodes = rank_nodes(r);
  std::set<std::string> hosts;
  for (const RankInventory& inv : r.inventory) hosts.insert(inv.host);
  const int local_nodes = r.options.value("local_nodes", 0);
  // The split of --local-nodes, unless a FERRY_NODE_ID of the user's replaced it.
  bool emulated = local_nodes > 0;
  for (const RankInventory& inv : r.inventory) {
    emulated = emulated && inv.node_id == tools::emulated_node_id(inv.rank, r.world_size, local_nodes);
  }
  std::string note;
  if (emulated) {
    note = hosts.size() == 1 ? "emulated on one machine, FERRY_NODE_ID"
                             : "emulated on " + std::to_string(hosts.size()) + " hosts, FERRY_NODE_ID";
  } else {
    note = "FERRY_NODE_ID from the environment";
    if (local_nodes > 0) note += ", which wins over --local-nodes " + std::to_string(local_nodes);
  }
  return "nodes: " + std::to_string(std::set<std::string>(nodes.begin(), nodes.end()).size()) + " (" + note +
         "): " + tools::describe_rank_nodes(nodes);
}

std::string inventory_table(const Report& r) {
  const bool any_node_id = std::any_of(r.inventory.begin(), r.inventory.end(),
                                       [](const RankInventory& inv) { return !inv.node_id.empty(); });
  std::vector<std::vector<std::string>> rows;
  for (const RankInventory& inv : r.inventory) {
    std::vector<std::string> host_nics;
    for (const NicInfo& n : inv.host_nics) host_nics.push_back(n.name);
    std::vector<std::string> row{std::to_string(inv.rank), inv.host};
    if (any_node_id) row.push_back(inv.node_id.empty() ? "-" : inv.node_id);
    row.insert(row.end(), {std::to_string(inv.local_rank), inv.gpu < 0 ? "-" : std::to_string(inv.gpu),
                           join(inv.nics), inv.cores.empty() ? "-" : inv.cores,
                           inv.numa_node < 0 ? "-" : std::to_string(inv.numa_node), join(host_nics)});
    rows.push_back(std::move(row));
  }
  std::vector<std::string> header{"rank", "host"};
  if (any_node_id) header.push_back("node");
  header.insert(header.end(), {"local", "gpu", "nics", "cores", "numa", "host nics"});
  std::string out = text_table(header, rows);
  if (const std::string line = nodes_line(r); !line.empty()) out += line + "\n";
  return out;
}

}  // namespace ferry::check
