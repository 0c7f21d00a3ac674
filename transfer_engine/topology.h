// What a node looks like to Ferry (hwloc): GPUs, NICs, NUMA nodes, and how far each NIC is from
// each GPU over PCIe, so a rank drives the NICs behind its own PCIe switch and its worker thread
// runs on cores of the socket those NICs hang off.
//
// A Topology is plain data: discover() or from_xml() read hwloc once and keep no hwloc handle, so a
// Topology is cheap to copy and safe to share between threads.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ferry::te {

// How a GPU reaches a NIC, best first (the vocabulary of `nvidia-smi topo -m`):
//   pix   through at most one bridge on each side of a shared PCIe switch
//   pxb   through several PCIe bridges, without the host bridge
//   phb   through the host bridge (same root complex)
//   node  across root complexes of one NUMA node / socket
//   sys   across the inter-socket link
enum class PciPath : uint8_t { pix = 0, pxb = 1, phb = 2, node = 3, sys = 4 };
const char* pci_path_name(PciPath path);  // "PIX", "PXB", ...

struct TopoGpu {
  int index = 0;           // in PCI bus id order: CUDA's order with CUDA_DEVICE_ORDER=PCI_BUS_ID
  std::string pci_bus_id;  // "0000:53:00.0"
  uint16_t vendor_id = 0;
  uint16_t device_id = 0;
  std::string name;       // model name when hwloc knows it, else ""
  int numa_node = -1;     // -1: not attached to a single NUMA node
  std::vector<int> cpus;  // NUMA-local CPUs (Linux CPU numbers)
};

// efa: an AWS EFA device (vendor 0x1d0f, device 0xefa*). rdma: another verbs device (ConnectX in
// InfiniBand or RoCE mode). ethernet: a network device without verbs (ENA, virtio-net, ...).
enum class NicKind : uint8_t { efa, rdma, ethernet, other };
const char* nic_kind_name(NicKind kind);  // "efa", "rdma", "ethernet", "other"

struct TopoNic {
  int index = 0;
  std::string pci_bus_id;  // "" for a NIC hwloc sees without a PCI device
  uint16_t vendor_id = 0;  // 0x1d0f: Amazon (EFA, ENA); 0x15b3: Mellanox/NVIDIA
  uint16_t device_id = 0;
  NicKind kind = NicKind::other;
  // OS names, verbs device first: "rdmap16s27" or "mlx5_0", then the netdev ("eth0").
  std::vector<std::string> names;
  int numa_node = -1;
  std::vector<int> cpus;
};

struct TopoNuma {
  int os_index = 0;
  uint64_t memory_bytes = 0;
  std::vector<int> cpus;
};

// One GPU-to-NIC relation: the PCIe path class and the number of topology hops (device up to the
// common ancestor and down again), which orders NICs of the same class.
struct GpuNicDistance {
  PciPath path = PciPath::sys;
  int hops = 0;
};

enum class DeviceKind : uint8_t { gpu, nic };

class Topology {
 public:
  // This machine. No GPU and no NIC is a valid result. Throws ferry::Error(Status::internal) with
  // hwloc's reason when hwloc cannot load the topology.
  static Topology discover();
  // An hwloc v2 XML export (`lstopo --of xml`, `hwloc-gather-topology`), for tests and for
  // inspecting another machine's topology. Throws ferry::Error(Status::invalid_argument).
  static Topology from_xml(const std::string& xml);

  const std::vector<TopoGpu>& gpus() const { return gpus_; }
  const std::vector<TopoNic>& nics() const { return nics_; }
  const std::vector<TopoNuma>& numa_nodes() const { return numa_; }
  const std::vector<int>& cpus() const { return cpus_; }  // every CPU of the machine
  std::string host_name() const { return host_name_; }

  GpuNicDistance distance(int gpu, int nic) const;
  // Every NIC, nearest to `gpu` first (path class, then hops, then NIC index).
  std::vector<int> nics_near_gpu(int gpu) const;
  // The NICs tied for nearest: the ones a rank driving `gpu` should use.
  std::vector<int> nearest_nics(int gpu) const;
  // NUMA-local CPUs of a GPU or NIC (the whole machine when it is not local to one NUMA node).
  std::vector<int> cores_near(DeviceKind kind, int index) const;

  // -1 when absent. find_gpu takes a PCI bus id in any case ("0000:53:00.0", "00000000:53:00.0"
  // as CUDA prints it). find_nic takes an OS name, a libfabric domain built from one
  // ("rdmap16s27-rdm" for "rdmap16s27"), or a PCI bus id.
  int find_gpu(const std::string& pci_bus_id) const;
  int find_nic(const std::string& name) const;
  // `domains` reordered nearest to `gpu` first; names that match no NIC keep their order, last.
  std::vector<std::string> order_near_gpu(int gpu, const std::vector<std::string>& domains) const;

  // A readable table: NUMA nodes, GPUs, NICs, the GPU x NIC path matrix, and for each GPU the NICs
  // and cores it would use.
  std::string report() const;

 private:
  friend struct TopologyBuilder;
  std::string host_name_;
  std::vector<int> cpus_;
  std::vector<TopoNuma> numa_;
  std::vector<TopoGpu> gpus_;
  std::vector<TopoNic> nics_;
  std::vector<std::vector<GpuNicDistance>> distance_;  // [gpu][nic]
};

// "0-3,8-11"
std::string format_cpu_list(const std::vector<int>& cpus);

// Pins the calling thread to `cpus` (Linux CPU numbers), keeping only those this process may run
// on (cgroup cpusets, taskset). Returns the CPUs actually used. Throws ferry::Error
// (Status::invalid_argument) when none of them is allowed, naming both sets.
std::vector<int> bind_thread_to_cores(const std::vector<int>& cpus);

}  // namespace ferry::te
