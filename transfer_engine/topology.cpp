#include "transfer_engine/topology.h"

#include <hwloc.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <sstream>
#include <tuple>

#include "transfer_engine/error.h"

namespace ferry::te {

const char* pci_path_name(PciPath path) {
  switch (path) {
    case PciPath::pix:
      return "PIX";
    case PciPath::pxb:
      return "PXB";
    case PciPath::phb:
      return "PHB";
    case PciPath::node:
      return "NODE";
    case PciPath::sys:
      return "SYS";
  }
  return "?";
}

const char* nic_kind_name(NicKind kind) {
  switch (kind) {
    case NicKind::efa:
      return "efa";
    case NicKind::rdma:
      return "rdma";
    case NicKind::ethernet:
      return "ethernet";
    case NicKind::other:
      return "other";
  }
  return "?";
}

std::string format_cpu_list(const std::vector<int>& cpus) {
  std::vector<int> sorted = cpus;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  std::string s;
  for (size_t i = 0; i < sorted.size();) {
    size_t j = i;
    while (j + 1 < sorted.size() && sorted[j + 1] == sorted[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(sorted[i]);
    if (j > i) s += "-" + std::to_string(sorted[j]);
    i = j + 1;
  }
  return s.empty() ? "-" : s;
}

namespace {

constexpr uint16_t kVendorNvidia = 0x10de;
constexpr uint16_t kVendorAmazon = 0x1d0f;
constexpr unsigned kClassDisplay = 0x03;  // 0x0300 VGA, 0x0302 3D controller (H100 and friends)
constexpr unsigned kClassNetwork = 0x02;  // 0x0200 Ethernet, 0x0207 InfiniBand

struct TopologyDeleter {
  void operator()(hwloc_topology* t) const { hwloc_topology_destroy(t); }
};
using TopologyHandle = std::unique_ptr<hwloc_topology, TopologyDeleter>;

std::string pci_bus_id(const hwloc_obj_t pci) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%04x:%02x:%02x.%01x", pci->attr->pcidev.domain,
                pci->attr->pcidev.bus, pci->attr->pcidev.dev, pci->attr->pcidev.func);
  return buf;
}

std::vector<int> cpus_of(hwloc_const_bitmap_t set) {
  std::vector<int> cpus;
  if (set == nullptr) return cpus;
  int i;
  hwloc_bitmap_foreach_begin(i, set) {
    cpus.push_back(i);
  }
  hwloc_bitmap_foreach_end();
  return cpus;
}

// The NUMA node and CPUs an I/O object is local to: those of its first non-I/O ancestor.
std::pair<int, std::vector<int>> locality(hwloc_topology_t topo, hwloc_obj_t obj) {
  hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(topo, obj);
  if (anc == nullptr) return {-1, {}};
  int numa = -1;
  if (anc->nodeset != nullptr && hwloc_bitmap_weight(anc->nodeset) == 1) {
    numa = hwloc_bitmap_first(anc->nodeset);
  }
  return {numa, cpus_of(anc->cpuset)};
}

hwloc_obj_t pci_ancestor(hwloc_obj_t obj) {
  for (hwloc_obj_t p = obj->parent; p != nullptr; p = p->parent) {
    if (p->type == HWLOC_OBJ_PCI_DEVICE) return p;
  }
  return nullptr;
}

std::vector<hwloc_obj_t> chain_to_root(hwloc_obj_t obj) {
  std::vector<hwloc_obj_t> chain;
  for (; obj != nullptr; obj = obj->parent) chain.push_back(obj);
  return chain;
}

GpuNicDistance measure(hwloc_obj_t gpu, hwloc_obj_t nic, int gpu_numa, int nic_numa) {
  std::vector<hwloc_obj_t> a = chain_to_root(gpu), b = chain_to_root(nic);
  size_t ia = 0, ib = 0;
  bool found = false;
  for (size_t i = 0; i < a.size() && !found; ++i) {
    auto it = std::find(b.begin(), b.end(), a[i]);
    if (it != b.end()) {
      ia = i;
      ib = static_cast<size_t>(it - b.begin());
      found = true;
    }
  }
  if (!found) return {PciPath::sys, static_cast<int>(a.size() + b.size())};
  hwloc_obj_t common = a[ia];
  GpuNicDistance d;
  d.hops = static_cast<int>(ia + ib);
  auto bridges_below = [](const std::vector<hwloc_obj_t>& chain, size_t end) {
    int n = 0;
    for (size_t i = 0; i < end; ++i) n += chain[i]->type == HWLOC_OBJ_BRIDGE;
    return n;
  };
  if (common->type == HWLOC_OBJ_BRIDGE) {
    if (common->attr->bridge.upstream_type == HWLOC_OBJ_BRIDGE_HOST) {
      d.path = PciPath::phb;
    } else {
      d.path = bridges_below(a, ia) <= 1 && bridges_below(b, ib) <= 1 ? PciPath::pix : PciPath::pxb;
    }
  } else if (common->type == HWLOC_OBJ_PCI_DEVICE || common->type == HWLOC_OBJ_OS_DEVICE) {
    d.path = PciPath::pix;
  } else {
    d.path = gpu_numa >= 0 && gpu_numa == nic_numa ? PciPath::node : PciPath::sys;
  }
  return d;
}

bool parse_bus_id(const std::string& s, unsigned& domain, unsigned& bus, unsigned& dev,
                  unsigned& func) {
  char tail = 0;
  if (std::sscanf(s.c_str(), "%x:%x:%x.%x%c", &domain, &bus, &dev, &func, &tail) == 4) return true;
  domain = 0;  // "53:00.0" without a domain
  return std::sscanf(s.c_str(), "%x:%x.%x%c", &bus, &dev, &func, &tail) == 3;
}

bool same_bus_id(const std::string& a, const std::string& b) {
  unsigned d1, b1, v1, f1, d2, b2, v2, f2;
  if (!parse_bus_id(a, d1, b1, v1, f1) || !parse_bus_id(b, d2, b2, v2, f2)) return false;
  return std::tie(d1, b1, v1, f1) == std::tie(d2, b2, v2, f2);
}

}  // namespace

// Reads a loaded hwloc topology into a Topology (a friend, so it can fill the private fields).
struct TopologyBuilder {
  static Topology build(hwloc_topology_t topo) {
    Topology t;
    hwloc_obj_t root = hwloc_get_root_obj(topo);
    if (const char* host = hwloc_obj_get_info_by_name(root, "HostName")) t.host_name_ = host;
    t.cpus_ = cpus_of(hwloc_topology_get_allowed_cpuset(topo));

    for (hwloc_obj_t n = nullptr; (n = hwloc_get_next_obj_by_type(topo, HWLOC_OBJ_NUMANODE, n));) {
      t.numa_.push_back(
          {static_cast<int>(n->os_index), n->attr->numanode.local_memory, cpus_of(n->cpuset)});
    }

    std::vector<hwloc_obj_t> gpu_objs, nic_objs;
    for (hwloc_obj_t p = nullptr; (p = hwloc_get_next_pcidev(topo, p));) {
      unsigned cls = p->attr->pcidev.class_id >> 8;
      if (p->attr->pcidev.vendor_id == kVendorNvidia && cls == kClassDisplay) {
        gpu_objs.push_back(p);
      } else if (cls == kClassNetwork) {
        nic_objs.push_back(p);
      }
    }
    // Network OS devices whose PCI device hwloc did not classify as a NIC, or that have none.
    std::vector<std::pair<hwloc_obj_t, std::vector<hwloc_obj_t>>> nic_devs;
    for (hwloc_obj_t p : nic_objs) nic_devs.push_back({p, {}});
    for (hwloc_obj_t o = nullptr; (o = hwloc_get_next_osdev(topo, o));) {
      if (o->attr->osdev.type != HWLOC_OBJ_OSDEV_NETWORK &&
          o->attr->osdev.type != HWLOC_OBJ_OSDEV_OPENFABRICS) {
        continue;
      }
      hwloc_obj_t pci = pci_ancestor(o);
      hwloc_obj_t owner = pci != nullptr ? pci : o;
      auto it = std::find_if(nic_devs.begin(), nic_devs.end(),
                             [&](const auto& entry) { return entry.first == owner; });
      if (it == nic_devs.end()) {
        nic_devs.push_back({owner, {}});
        it = std::prev(nic_devs.end());
      }
      it->second.push_back(o);
    }

    auto by_bus = [](hwloc_obj_t a, hwloc_obj_t b) {
      auto key = [](hwloc_obj_t o) {
        return o->type == HWLOC_OBJ_PCI_DEVICE
                   ? std::make_tuple(0, pci_bus_id(o), std::string())
                   : std::make_tuple(1, std::string(), std::string(o->name ? o->name : ""));
      };
      return key(a) < key(b);
    };
    std::sort(gpu_objs.begin(), gpu_objs.end(), by_bus);
    std::sort(nic_devs.begin(), nic_devs.end(),
              [&](const auto& a, const auto& b) { return by_bus(a.first, b.first); });

    for (hwloc_obj_t p : gpu_objs) {
      TopoGpu g;
      g.index = static_cast<int>(t.gpus_.size());
      g.pci_bus_id = pci_bus_id(p);
      g.vendor_id = p->attr->pcidev.vendor_id;
      g.device_id = p->attr->pcidev.device_id;
      if (const char* name = hwloc_obj_get_info_by_name(p, "PCIDevice")) g.name = name;
      std::tie(g.numa_node, g.cpus) = locality(topo, p);
      t.gpus_.push_back(std::move(g));
    }
    std::vector<hwloc_obj_t> nic_anchor;
    for (const auto& [owner, devs] : nic_devs) {
      // A named reference, not the structured binding: lambdas may not capture bindings in clang 14.
      const std::vector<hwloc_obj_t>& osdevs = devs;
      TopoNic n;
      n.index = static_cast<int>(t.nics_.size());
      bool verbs = false;
      for (hwloc_obj_t o : osdevs) {
        if (o->name) n.names.push_back(o->name);
        verbs |= o->attr->osdev.type == HWLOC_OBJ_OSDEV_OPENFABRICS;
      }
      // Verbs device first: that is the name libfabric's efa and verbs domains are built from.
      std::stable_sort(n.names.begin(), n.names.end(),
                       [&](const std::string& a, const std::string& b) {
                         auto is_verbs = [&](const std::string& name) {
                           for (hwloc_obj_t o : osdevs) {
                             if (o->name && name == o->name)
                               return o->attr->osdev.type == HWLOC_OBJ_OSDEV_OPENFABRICS;
                           }
                           return false;
                         };
                         return is_verbs(a) && !is_verbs(b);
                       });
      if (owner->type == HWLOC_OBJ_PCI_DEVICE) {
        n.pci_bus_id = pci_bus_id(owner);
        n.vendor_id = owner->attr->pcidev.vendor_id;
        n.device_id = owner->attr->pcidev.device_id;
      }
      bool is_efa = n.vendor_id == kVendorAmazon && (n.device_id & 0xfff0) == 0xefa0;
      bool is_network_class = owner->type == HWLOC_OBJ_PCI_DEVICE &&
                              (owner->attr->pcidev.class_id >> 8) == kClassNetwork;
      if (is_efa) {
        n.kind = NicKind::efa;
      } else if (verbs ||
                 (owner->type == HWLOC_OBJ_PCI_DEVICE && owner->attr->pcidev.class_id == 0x0207)) {
        n.kind = NicKind::rdma;
      } else if (is_network_class || !osdevs.empty()) {
        n.kind = NicKind::ethernet;
      }
      std::tie(n.numa_node, n.cpus) = locality(topo, owner);
      t.nics_.push_back(std::move(n));
      nic_anchor.push_back(owner);
    }

    t.distance_.assign(t.gpus_.size(), std::vector<GpuNicDistance>(t.nics_.size()));
    for (size_t g = 0; g < t.gpus_.size(); ++g) {
      for (size_t n = 0; n < t.nics_.size(); ++n) {
        t.distance_[g][n] =
            measure(gpu_objs[g], nic_anchor[n], t.gpus_[g].numa_node, t.nics_[n].numa_node);
      }
    }
    return t;
  }

  static Topology load(Status failure_status, const std::string& what,
                       const std::function<int(hwloc_topology_t)>& configure) {
    hwloc_topology_t raw = nullptr;
    if (hwloc_topology_init(&raw) != 0) {
      raise(Status::internal,
            "topology: hwloc_topology_init: " + std::string(std::strerror(errno)));
    }
    TopologyHandle topo(raw);
    // GPUs and NICs are I/O objects, which hwloc drops unless asked.
    hwloc_topology_set_io_types_filter(raw, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    if (configure(raw) != 0) {
      raise(failure_status, "topology: " + what + ": " + std::string(std::strerror(errno)));
    }
    if (hwloc_topology_load(raw) != 0) {
      raise(failure_status,
            "topology: loading " + what + " failed: " + std::string(std::strerror(errno)));
    }
    return build(raw);
  }
};

Topology Topology::discover() {
  return TopologyBuilder::load(Status::internal, "this machine's topology",
                               [](hwloc_topology_t) { return 0; });
}

Topology Topology::from_xml(const std::string& xml) {
  return TopologyBuilder::load(
      Status::invalid_argument, "hwloc XML (" + std::to_string(xml.size()) + " bytes)",
      [&](hwloc_topology_t t) {
        // hwloc counts the terminating NUL in the buffer size.
        return hwloc_topology_set_xmlbuffer(t, xml.c_str(), static_cast<int>(xml.size() + 1));
      });
}

GpuNicDistance Topology::distance(int gpu, int nic) const {
  if (gpu < 0 || gpu >= static_cast<int>(gpus_.size()) || nic < 0 ||
      nic >= static_cast<int>(nics_.size())) {
    raise(Status::invalid_argument,
          "topology: no gpu " + std::to_string(gpu) + " / nic " + std::to_string(nic) + " (have " +
              std::to_string(gpus_.size()) + " GPUs, " + std::to_string(nics_.size()) + " NICs)");
  }
  return distance_[gpu][nic];
}

std::vector<int> Topology::nics_near_gpu(int gpu) const {
  std::vector<int> order;
  for (int n = 0; n < static_cast<int>(nics_.size()); ++n) order.push_back(n);
  if (order.empty()) return order;
  distance(gpu, 0);  // validates gpu
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    const GpuNicDistance &da = distance_[gpu][a], &db = distance_[gpu][b];
    return std::tie(da.path, da.hops) < std::tie(db.path, db.hops);
  });
  return order;
}

std::vector<int> Topology::nearest_nics(int gpu) const {
  std::vector<int> order = nics_near_gpu(gpu);
  if (order.empty()) return order;
  const GpuNicDistance best = distance_[gpu][order[0]];
  std::vector<int> nearest;
  for (int n : order) {
    if (distance_[gpu][n].path == best.path && distance_[gpu][n].hops == best.hops)
      nearest.push_back(n);
  }
  return nearest;
}

std::vector<int> Topology::cores_near(DeviceKind kind, int index) const {
  const bool gpu = kind == DeviceKind::gpu;
  const int count = static_cast<int>(gpu ? gpus_.size() : nics_.size());
  if (index < 0 || index >= count) {
    raise(Status::invalid_argument, std::string("topology: no ") + (gpu ? "gpu " : "nic ") +
                                        std::to_string(index) + " (have " + std::to_string(count) +
                                        ")");
  }
  const std::vector<int>& cpus = gpu ? gpus_[index].cpus : nics_[index].cpus;
  return cpus.empty() ? cpus_ : cpus;
}

int Topology::find_gpu(const std::string& pci_bus_id) const {
  for (const TopoGpu& g : gpus_) {
    if (same_bus_id(g.pci_bus_id, pci_bus_id)) return g.index;
  }
  return -1;
}

int Topology::find_nic(const std::string& name) const {
  for (const TopoNic& n : nics_) {
    if (!n.pci_bus_id.empty() && same_bus_id(n.pci_bus_id, name)) return n.index;
    for (const std::string& os : n.names) {
      if (name == os) return n.index;
      // libfabric domains are OS names with a suffix: "rdmap16s27-rdm", "rdmap16s27-dgrm".
      if (name.size() > os.size() && name.compare(0, os.size(), os) == 0 &&
          name[os.size()] == '-') {
        return n.index;
      }
    }
  }
  return -1;
}

std::vector<std::string> Topology::order_near_gpu(int gpu,
                                                  const std::vector<std::string>& domains) const {
  std::vector<int> order = nics_near_gpu(gpu);
  std::vector<int> rank_of(nics_.size());
  for (size_t i = 0; i < order.size(); ++i) rank_of[order[i]] = static_cast<int>(i);
  std::vector<std::pair<int, std::string>> keyed;
  for (const std::string& d : domains) {
    int nic = find_nic(d);
    keyed.push_back({nic < 0 ? static_cast<int>(nics_.size()) : rank_of[nic], d});
  }
  std::stable_sort(keyed.begin(), keyed.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<std::string> out;
  for (auto& [k, d] : keyed) out.push_back(std::move(d));
  return out;
}

std::string Topology::report() const {
  std::ostringstream o;
  auto numa_text = [](int numa) { return numa < 0 ? std::string("-") : std::to_string(numa); };
  auto gib = [](uint64_t bytes) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.1f GiB", bytes / double(1ull << 30));
    return std::string(buf);
  };
  auto ids = [](uint16_t v, uint16_t d) {
    char buf[24];
    std::snprintf(buf, sizeof(buf), "[%04x:%04x]", v, d);
    return std::string(buf);
  };
  auto pad = [](std::string s, size_t width) {
    if (s.size() < width) s.append(width - s.size(), ' ');
    return s;
  };
  o << "Topology of " << (host_name_.empty() ? std::string("this machine") : host_name_) << ": "
    << numa_.size() << " NUMA node(s), " << cpus_.size() << " CPU(s), " << gpus_.size()
    << " GPU(s), " << nics_.size() << " NIC(s)\n";

  o << "\nNUMA nodes\n  " << pad("node", 6) << pad("memory", 12) << "cpus\n";
  for (const TopoNuma& n : numa_) {
    o << "  " << pad(std::to_string(n.os_index), 6) << pad(gib(n.memory_bytes), 12)
      << format_cpu_list(n.cpus) << "\n";
  }

  o << "\nGPUs\n";
  if (gpus_.empty())
    o << "  (none)\n";
  else
    o << "  " << pad("gpu", 6) << pad("pci", 15) << pad("numa", 6) << "device\n";
  for (const TopoGpu& g : gpus_) {
    o << "  " << pad(std::to_string(g.index), 6) << pad(g.pci_bus_id, 15)
      << pad(numa_text(g.numa_node), 6) << ids(g.vendor_id, g.device_id)
      << (g.name.empty() ? "" : " " + g.name) << "\n";
  }

  o << "\nNICs\n";
  if (nics_.empty())
    o << "  (none)\n";
  else
    o << "  " << pad("nic", 6) << pad("pci", 15) << pad("numa", 6) << pad("kind", 10)
      << pad("device", 13) << "names\n";
  for (const TopoNic& n : nics_) {
    std::string names;
    for (const std::string& s : n.names) names += (names.empty() ? "" : ", ") + s;
    o << "  " << pad(std::to_string(n.index), 6)
      << pad(n.pci_bus_id.empty() ? "-" : n.pci_bus_id, 15) << pad(numa_text(n.numa_node), 6)
      << pad(nic_kind_name(n.kind), 10)
      << pad(n.pci_bus_id.empty() ? "-" : ids(n.vendor_id, n.device_id), 13)
      << (names.empty() ? "-" : names) << "\n";
  }

  if (!gpus_.empty() && !nics_.empty()) {
    auto rtrim = [](std::string s) { return s.erase(s.find_last_not_of(' ') + 1); };
    o << "\nGPU to NIC paths (PIX < PXB < PHB < NODE < SYS)\n";
    std::string header = "  " + pad("", 6);
    for (const TopoNic& n : nics_) header += pad("nic" + std::to_string(n.index), 7);
    o << rtrim(header) << "\n";
    for (const TopoGpu& g : gpus_) {
      std::string row = "  " + pad("gpu" + std::to_string(g.index), 6);
      for (const TopoNic& n : nics_) row += pad(pci_path_name(distance_[g.index][n.index].path), 7);
      o << rtrim(row) << "\n";
    }
  }

  o << "\nPlacement\n";
  if (gpus_.empty()) {
    o << "  no GPU: host-only ranks; worker cores follow their NICs\n";
    for (const TopoNic& n : nics_) {
      o << "  nic" << n.index << " -> cores "
        << format_cpu_list(cores_near(DeviceKind::nic, n.index)) << "\n";
    }
    if (nics_.empty()) o << "  no NIC either: any core, " << format_cpu_list(cpus_) << "\n";
  }
  for (const TopoGpu& g : gpus_) {
    o << "  gpu" << g.index << " -> ";
    std::vector<int> near = nearest_nics(g.index);
    if (near.empty()) {
      o << "no NIC";
    } else {
      o << (near.size() == 1 ? "nic " : "nics ");
      for (size_t i = 0; i < near.size(); ++i) o << (i ? "," : "") << near[i];
      o << " (" << pci_path_name(distance_[g.index][near[0]].path) << ")";
    }
    o << ", worker cores " << format_cpu_list(cores_near(DeviceKind::gpu, g.index)) << " (numa "
      << numa_text(g.numa_node) << ")\n";
  }
  return o.str();
}

std::vector<int> bind_thread_to_cores(const std::vector<int>& cpus) {
  // The main thread's mask stands for the process (cgroup cpuset, taskset): a thread may have been
  // narrowed already, the process as a whole may use all of these.
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(getpid(), sizeof(allowed), &allowed) != 0) {
    raise(Status::internal,
          "bind_thread_to_cores: sched_getaffinity: " + std::string(std::strerror(errno)));
  }
  cpu_set_t want;
  CPU_ZERO(&want);
  std::vector<int> used, allowed_list;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &allowed)) allowed_list.push_back(c);
  }
  for (int c : cpus) {
    if (c >= 0 && c < CPU_SETSIZE && CPU_ISSET(c, &allowed) && !CPU_ISSET(c, &want)) {
      CPU_SET(c, &want);
      used.push_back(c);
    }
  }
  if (used.empty()) {
    raise(Status::invalid_argument,
          "bind_thread_to_cores: none of cpus " + format_cpu_list(cpus) +
              " is allowed to this process (allowed: " + format_cpu_list(allowed_list) + ")");
  }
  int rc = pthread_setaffinity_np(pthread_self(), sizeof(want), &want);
  if (rc != 0) {
    raise(Status::internal, "bind_thread_to_cores(" + format_cpu_list(used) +
                                "): pthread_setaffinity_np: " + std::strerror(rc));
  }
  std::sort(used.begin(), used.end());
  return used;
}

}  // namespace ferry::te
