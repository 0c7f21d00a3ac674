// Stage 1: what each node has (GPUs, NICs with link speed and PCIe/NUMA placement) and what each
// rank will use, then node-level verdicts on rank 0.
#include <rdma/fabric.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include "tools/check/check.h"
#include "tools/common/launch.h"
#include "transfer_engine/error.h"
#include "transfer_engine/topology.h"

#if defined(FERRY_HAVE_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace ferry::check {

namespace fs = std::filesystem;

static std::string read_line(const std::string& path) {
  std::ifstream f(path);
  std::string s;
  if (f) std::getline(f, s);
  return s;
}

static int read_int(const std::string& path, int fallback) {
  const std::string s = read_line(path);
  try {
    return s.empty() ? fallback : std::stoi(s);
  } catch (...) {
    return fallback;
  }
}

static std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

static int pci_numa_node(const std::string& bus_id) {
  if (bus_id.empty()) return -1;
  return read_int("/sys/bus/pci/devices/" + lower(bus_id) + "/numa_node", -1);
}

// Every domain the provider lists for RDM endpoints with RMA, once each (tcp lists an interface once
// per address family).
static std::vector<NicInfo> list_provider_nics(const std::string& provider) {
  struct InfoDeleter {
    void operator()(fi_info* i) const { fi_freeinfo(i); }
  };
  std::unique_ptr<fi_info, InfoDeleter> hints(fi_allocinfo());
  if (!hints) raise(Status::out_of_memory, "fi_allocinfo for the NIC inventory");
  hints->ep_attr->type = FI_EP_RDM;
  hints->caps = FI_RMA;
  // efa-direct is the efa provider with a restricted feature set; listing efa finds the same NICs.
  const std::string prov_name = provider == "efa-direct" ? "efa" : provider;
  hints->fabric_attr->prov_name = strdup(prov_name.c_str());
  fi_info* raw = nullptr;
  const int rc = fi_getinfo(FI_VERSION(1, 17), nullptr, nullptr, 0, hints.get(), &raw);
  std::unique_ptr<fi_info, InfoDeleter> infos(raw);
  std::vector<NicInfo> out;
  if (rc != 0) return out;  // no NIC for this provider: the judge reports it against expectations
  std::set<std::string> seen;
  for (fi_info* i = infos.get(); i; i = i->next) {
    if (!i->domain_attr || !i->domain_attr->name) continue;
    const std::string name = i->domain_attr->name;
    if (!seen.insert(name).second) continue;
    NicInfo nic;
    nic.name = name;
    nic.provider = i->fabric_attr && i->fabric_attr->prov_name ? i->fabric_attr->prov_name : provider;
    nic.fabric = i->fabric_attr && i->fabric_attr->name ? i->fabric_attr->name : "";
    if (i->nic && i->nic->link_attr && i->nic->link_attr->speed > 0) {
      nic.link_gbps = double(i->nic->link_attr->speed) / 1e9;
      nic.speed_source = "provider";
    }
    nic.link_state = "unknown";
    if (i->nic && i->nic->link_attr) {
      if (i->nic->link_attr->state == FI_LINK_UP) nic.link_state = "up";
      if (i->nic->link_attr->state == FI_LINK_DOWN) nic.link_state = "down";
    }
    if (i->nic && i->nic->bus_attr && i->nic->bus_attr->bus_type == FI_BUS_PCI) {
      const auto& p = i->nic->bus_attr->attr.pci;
      char buf[32];
      std::snprintf(buf, sizeof buf, "%04x:%02x:%02x.%x", p.domain_id, p.bus_id, p.device_id, p.function_id);
      nic.pci_bus_id = buf;
    }
    // Network interfaces (tcp, and the netdev behind an EFA or ConnectX port when named so) say more in sysfs.
    const std::string sys = "/sys/class/net/" + name;
    if (fs::exists(sys)) {
      if (nic.link_gbps < 0) {
        const int mbps = read_int(sys + "/speed", -1);
        if (mbps > 0) {
          nic.link_gbps = mbps / 1000.0;
          nic.speed_source = "sysfs";
        }
      }
      // carrier reads 1/0 only while the interface is administratively up; loopback has no carrier file
      // worth trusting, so it stays "unknown" when operstate says so.
      if (nic.link_state == "unknown") {
        const std::string oper = read_line(sys + "/operstate");
        const int carrier = read_int(sys + "/carrier", -1);
        if (oper == "down" || carrier == 0) nic.link_state = "down";
        else if (oper == "up" || carrier == 1) nic.link_state = "up";
      }
      std::error_code ec;
      const fs::path dev = fs::read_symlink(sys + "/device", ec);
      // Only a PCI address ("0000:00:03.0"); a virtio netdev points at "virtio2" instead.
      const std::string bus = ec ? "" : dev.filename().string();
      if (nic.pci_bus_id.empty() && std::count(bus.begin(), bus.end(), ':') == 2) nic.pci_bus_id = bus;
    }
    nic.numa_node = pci_numa_node(nic.pci_bus_id);
    out.push_back(std::move(nic));
  }
  return out;
}

static std::vector<GpuInfo> list_gpus() {
  std::vector<GpuInfo> out;
#if defined(FERRY_HAVE_CUDA)
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for a host-only check
    return out;
  }
  for (int d = 0; d < n; ++d) {
    GpuInfo g;
    g.index = d;
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) == cudaSuccess) g.name = prop.name;
    char bus[32] = {};
    if (cudaDeviceGetPCIBusId(bus, sizeof bus, d) == cudaSuccess) g.pci_bus_id = lower(bus);
    g.numa_node = pci_numa_node(g.pci_bus_id);
    out.push_back(std::move(g));
  }
#endif
  return out;
}

// "0-3,8,10-11" from the affinity mask, and the NUMA node of the first core.
static std::string affinity_cores(int* numa_node) {
  cpu_set_t set;
  CPU_ZERO(&set);
  *numa_node = -1;
  if (sched_getaffinity(0, sizeof set, &set) != 0) return "";
  std::vector<int> cores;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) cores.push_back(c);
  std::ostringstream out;
  for (size_t i = 0; i < cores.size();) {
    size_t j = i;
    while (j + 1 < cores.size() && cores[j + 1] == cores[j] + 1) ++j;
    out << (i ? "," : "") << cores[i];
    if (j > i) out << "-" << cores[j];
    i = j + 1;
  }
  if (!cores.empty()) {
    std::error_code ec;
    for (const auto& e : fs::directory_iterator("/sys/devices/system/cpu/cpu" + std::to_string(cores[0]), ec)) {
      const std::string n = e.path().filename().string();
      if (n.rfind("node", 0) == 0 && n.size() > 4 && std::isdigit(static_cast<unsigned char>(n[4]))) {
        *numa_node = std::atoi(n.c_str() + 4);
        break;
      }
    }
  }
  return out.str();
}

static std::string host_name() {
  char buf[256] = {};
  ::gethostname(buf, sizeof buf - 1);
  return buf;
}

RankInventory collect_inventory(const Options& opt, const te::Bootstrap& boot) {
  RankInventory inv;
  inv.rank = boot.rank();
  inv.local_rank = boot.local_rank();
  inv.local_size = boot.local_size();
  inv.host = host_name();
  if (const char* id = std::getenv(tools::kNodeIdVar); id && *id) inv.node_id = id;
  inv.pid = int(::getpid());
  inv.host_nics = list_provider_nics(opt.provider);
  inv.host_gpus = list_gpus();
  inv.cores = affinity_cores(&inv.numa_node);
  if (!inv.host_gpus.empty()) inv.gpu = inv.host_gpus[size_t(inv.local_rank) % inv.host_gpus.size()].index;

  // The host's NIC set in slot order: the requested names (kept even when absent so the report
  // names what is missing), else every listed NIC, tcp's loopback only when nothing else exists.
  std::vector<std::string> host_set = opt.nics;
  if (host_set.empty()) {
    for (const NicInfo& n : inv.host_nics)
      if (n.name != "lo") host_set.push_back(n.name);
    if (host_set.empty())
      for (const NicInfo& n : inv.host_nics) host_set.push_back(n.name);
  }
  // Topology (hwloc): placement of NICs and GPUs, and the cores near what this rank drives.
  std::optional<te::Topology> topo;
  try {
    topo = te::Topology::discover();
  } catch (const std::exception& e) {
    inv.topology = std::string("topology unavailable: ") + e.what();
  }
  int topo_gpu = -1;
  if (topo) {
    if (inv.local_rank == 0) inv.topology = topo->report();
    if (inv.gpu >= 0) topo_gpu = topo->find_gpu(inv.host_gpus[size_t(inv.gpu)].pci_bus_id);
    for (NicInfo& n : inv.host_nics) {
      const int t = topo->find_nic(n.name);
      if (t < 0) continue;
      const te::TopoNic& tn = topo->nics()[size_t(t)];
      if (n.pci_bus_id.empty()) n.pci_bus_id = tn.pci_bus_id;
      if (n.numa_node < 0) n.numa_node = tn.numa_node;
    }
    // Nearest to this rank's GPU first, so a rank that uses fewer NICs than the host has takes the
    // close ones.
    if (topo_gpu >= 0 && opt.nics.empty()) host_set = topo->order_near_gpu(topo_gpu, host_set);
    if (topo_gpu >= 0) {
      for (int t : topo->nearest_nics(topo_gpu))
        for (const NicInfo& n : inv.host_nics)
          if (topo->find_nic(n.name) == t) inv.near_nics.push_back(n.name);
    }
  }
  for (const std::string& name : host_set) {
    const bool listed = std::any_of(inv.host_nics.begin(), inv.host_nics.end(),
                                    [&](const NicInfo& n) { return n.name == name; });
    if (!listed) inv.missing_nics.push_back(name);
  }
  // A launcher that pins each rank to its NICs (FERRY_DOMAINS, as the engine reads it) decides for
  // this rank; the judge then checks that choice instead of making one.
  const char* pinned = std::getenv("FERRY_DOMAINS");
  if (opt.nics.empty() && pinned && *pinned) {
    std::stringstream list(pinned);
    for (std::string name; std::getline(list, name, ',');)
      if (!name.empty()) inv.nics.push_back(name);
    for (const std::string& name : inv.nics) {
      const bool listed = std::any_of(inv.host_nics.begin(), inv.host_nics.end(),
                                      [&](const NicInfo& n) { return n.name == name; });
      if (!listed && std::find(inv.missing_nics.begin(), inv.missing_nics.end(), name) == inv.missing_nics.end())
        inv.missing_nics.push_back(name);
    }
  } else if (!host_set.empty()) {
    const int n = int(host_set.size());
    const int local_size = std::max(1, inv.local_size);
    const int per_rank = opt.nics_per_rank > 0 ? opt.nics_per_rank : std::max(1, n / local_size);
    for (int j = 0; j < per_rank; ++j) inv.nics.push_back(host_set[size_t((inv.local_rank * per_rank + j) % n)]);
  }
  if (topo) {
    // The cores the engine's worker would be pinned to: those near the first NIC, else near the GPU.
    std::vector<int> cores;
    const int first_nic = inv.nics.empty() ? -1 : topo->find_nic(inv.nics[0]);
    if (first_nic >= 0) cores = topo->cores_near(te::DeviceKind::nic, first_nic);
    else if (topo_gpu >= 0) cores = topo->cores_near(te::DeviceKind::gpu, topo_gpu);
    if (!cores.empty()) inv.cores = te::format_cpu_list(cores);
    for (const std::string& name : inv.nics) {
      const int t = topo->find_nic(name);
      inv.nic_paths.push_back(topo_gpu >= 0 && t >= 0 ? te::pci_path_name(topo->distance(topo_gpu, t).path) : "");
    }
  }
  return inv;
}

int max_slots(const std::vector<RankInventory>& all) {
  size_t m = 0;
  for (const RankInventory& inv : all) m = std::max(m, inv.nics.size());
  return int(m);
}

std::string nic_problem(const RankInventory& inv, int s) {
  const std::string where = "rank " + std::to_string(inv.rank) + " on " + inv.host;
  if (s >= int(inv.nics.size()) || inv.nics[size_t(s)].empty())
    return where + " has no NIC for slot " + std::to_string(s);
  const std::string& name = inv.nics[size_t(s)];
  if (std::find(inv.missing_nics.begin(), inv.missing_nics.end(), name) != inv.missing_nics.end())
    return "NIC " + name + " of " + where + " is not listed by the provider (down or absent)";
  return "";
}

std::vector<CheckResult> judge_inventory(const Options& opt, const std::vector<RankInventory>& all) {
  std::vector<CheckResult> out;
  std::map<std::string, std::vector<const RankInventory*>> by_host;
  for (const RankInventory& inv : all) by_host[inv.host].push_back(&inv);
  std::set<std::string> all_nic_names;
  for (const RankInventory& inv : all)
    for (const NicInfo& n : inv.host_nics)
      if (n.name != "lo") all_nic_names.insert(n.name);

  for (const auto& [host, ranks] : by_host) {
    const RankInventory& first = *ranks.front();
    // NICs present on this host.
    {
      CheckResult c{"inventory", "host " + host + ": NICs", Verdict::pass, "", nlohmann::json::object()};
      std::vector<std::string> names;
      for (const NicInfo& n : first.host_nics) names.push_back(n.name);
      int usable = 0;
      for (const NicInfo& n : first.host_nics) usable += (n.name != "lo" || first.host_nics.size() == 1);
      c.metrics["nics"] = names;
      c.metrics["usable_nics"] = usable;
      std::vector<std::string> missing = first.missing_nics;
      if (opt.nics.empty()) {
        // Without a requested list, compare with what the other hosts have.
        for (const std::string& n : all_nic_names)
          if (std::find(names.begin(), names.end(), n) == names.end()) missing.push_back(n);
      }
      std::string why;
      if (first.host_nics.empty()) why = "provider " + opt.provider + " lists no NIC";
      if (!missing.empty()) {
        std::string m;
        for (const std::string& n : missing) m += (m.empty() ? "" : ", ") + n;
        why += (why.empty() ? "" : "; ") + std::string("missing NIC(s): ") + m;
      }
      if (opt.expect_nics_per_node > 0) {
        c.metrics["expected_nics"] = opt.expect_nics_per_node;
        const int have = opt.nics.empty() ? usable
                                          : int(opt.nics.size()) - int(first.missing_nics.size());
        if (have < opt.expect_nics_per_node)
          why += (why.empty() ? "" : "; ") + std::to_string(have) + " NIC(s) found, expected " +
                 std::to_string(opt.expect_nics_per_node);
      }
      if (!why.empty()) {
        c.verdict = Verdict::fail;
        c.reason = "host " + host + ": " + why;
      }
      out.push_back(std::move(c));
    }
    // Link state of every NIC a rank uses: a NIC that libfabric lists but whose link is down (a
    // pulled cable, a switch port down) would only show up later as timeouts.
    {
      CheckResult c{"inventory", "host " + host + ": NIC links up", Verdict::pass, "", nlohmann::json::object()};
      std::set<std::string> used;
      for (const RankInventory* r : ranks) used.insert(r->nics.begin(), r->nics.end());
      nlohmann::json states = nlohmann::json::object();
      for (const NicInfo& n : first.host_nics) {
        states[n.name] = n.link_state;
        if (used.count(n.name) && n.link_state == "down") {
          c.verdict = Verdict::fail;
          c.reason += (c.reason.empty() ? "" : "; ") + std::string("NIC ") + n.name + " on host " + host +
                      " is listed by the provider but its link is down";
        }
      }
      c.metrics["link_state"] = states;
      out.push_back(std::move(c));
    }
    // Ranks sharing a NIC although the host has one for each of them.
    {
      CheckResult c{"inventory", "host " + host + ": NIC assignment", Verdict::pass, "", nlohmann::json::object()};
      std::map<std::string, std::vector<int>> users;
      size_t wanted = 0;
      for (const RankInventory* r : ranks) {
        for (const std::string& n : r->nics) users[n].push_back(r->rank);
        wanted += r->nics.size();
      }
      size_t available = 0;
      for (const NicInfo& n : first.host_nics) available += n.name != "lo";
      if (available == 0) available = first.host_nics.size();
      if (!opt.nics.empty()) available = opt.nics.size() - first.missing_nics.size();
      nlohmann::json assignment = nlohmann::json::object();
      for (const auto& [nic, rs] : users) assignment[nic] = rs;
      c.metrics["assignment"] = assignment;
      for (const auto& [nic, rs] : users) {
        if (rs.size() > 1 && available >= wanted) {
          std::string list;
          for (int r : rs) list += (list.empty() ? "" : ", ") + std::to_string(r);
          c.verdict = Verdict::fail;
          c.reason += (c.reason.empty() ? "" : "; ") + std::string("ranks ") + list + " share NIC " + nic +
                      " although host " + host + " has " + std::to_string(available) + " NICs for " +
                      std::to_string(wanted) + " rank-NIC slots";
        }
      }
      out.push_back(std::move(c));
    }
    // NIC placement relative to the GPU (only meaningful with GPUs and NUMA information).
    for (const RankInventory* r : ranks) {
      CheckResult c{"inventory", "rank " + std::to_string(r->rank) + ": NIC near GPU", Verdict::pass, "",
                    nlohmann::json::object()};
      if (r->gpu < 0 || size_t(r->gpu) >= r->host_gpus.size()) {
        c.verdict = Verdict::skip;
        c.reason = "no GPU on " + r->host;
        out.push_back(std::move(c));
        continue;
      }
      const int gpu_numa = r->host_gpus[size_t(r->gpu)].numa_node;
      c.metrics["gpu"] = r->gpu;
      c.metrics["gpu_numa"] = gpu_numa;
      c.metrics["nic_paths"] = r->nic_paths;
      c.metrics["near_nics"] = r->near_nics;
      if (!r->near_nics.empty()) {
        // PCIe distance from hwloc: a NIC not among the nearest crosses more of the machine than
        // it has to (a shared root complex or the socket link).
        for (size_t i = 0; i < r->nics.size(); ++i) {
          const std::string& used = r->nics[i];
          if (std::find(r->near_nics.begin(), r->near_nics.end(), used) != r->near_nics.end()) continue;
          // A NIC hwloc does not see on PCIe (loopback, a bridge) has no distance to judge.
          if (i >= r->nic_paths.size() || r->nic_paths[i].empty()) continue;
          c.verdict = Verdict::fail;
          c.reason += (c.reason.empty() ? "" : "; ") + std::string("rank ") + std::to_string(r->rank) + " on " +
                      r->host + " uses NIC " + used + " (" +
                      (i < r->nic_paths.size() && !r->nic_paths[i].empty() ? r->nic_paths[i] : "?") + " from GPU " +
                      std::to_string(r->gpu) + "), nearest: " + r->near_nics.front();
        }
        out.push_back(std::move(c));
        continue;
      }
      if (gpu_numa < 0) {
        c.verdict = Verdict::skip;
        c.reason = "placement of GPU " + std::to_string(r->gpu) + " unknown";
        out.push_back(std::move(c));
        continue;
      }
      std::vector<std::string> near_nics;
      for (const NicInfo& n : r->host_nics)
        if (n.numa_node == gpu_numa) near_nics.push_back(n.name);
      for (const std::string& used : r->nics) {
        int numa = -1;
        for (const NicInfo& n : r->host_nics)
          if (n.name == used) numa = n.numa_node;
        if (numa >= 0 && numa != gpu_numa && !near_nics.empty()) {
          c.verdict = Verdict::fail;
          c.reason += (c.reason.empty() ? "" : "; ") + std::string("rank ") + std::to_string(r->rank) + " on " +
                      r->host + " uses NIC " + used + " on NUMA node " + std::to_string(numa) + ", GPU " +
                      std::to_string(r->gpu) + " is on node " + std::to_string(gpu_numa) + " (near: " +
                      near_nics.front() + ")";
        }
      }
      out.push_back(std::move(c));
    }
  }
  return out;
}

}  // namespace ferry::check
