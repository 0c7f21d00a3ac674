#include "csrc/cuda/locality.h"

#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>

#include "transfer_engine/error.h"

namespace ferry::cuda {

NodeIdentity make_node_identity(bool wants_ipc, const std::string& pci_bus_id) {
  NodeIdentity id{};
  std::string node;
  if (const char* env = std::getenv("FERRY_NODE_ID"); env && *env) {
    node = std::string("id:") + env;
  } else {
    char host[65] = {};
    gethostname(host, sizeof host - 1);
    std::string boot;
    std::ifstream in("/proc/sys/kernel/random/boot_id");
    if (in) std::getline(in, boot);
    node = std::string(host) + "/" + boot;
  }
  if (node.size() >= sizeof id.node)
    raise(Status::invalid_argument, "node identity '" + node + "' longer than " + std::to_string(sizeof id.node - 1) +
                                        " characters (FERRY_NODE_ID, or host name and boot id)");
  std::memcpy(id.node, node.data(), node.size());
  if (pci_bus_id.size() < sizeof id.pci_bus_id) std::memcpy(id.pci_bus_id, pci_bus_id.data(), pci_bus_id.size());
  // A GPU that cannot say where it sits cannot be matched with its peers: the engine path then.
  id.wants_ipc = wants_ipc && !pci_bus_id.empty() && pci_bus_id.size() < sizeof id.pci_bus_id ? 1 : 0;
  return id;
}

bool same_node(const NodeIdentity& a, const NodeIdentity& b) {
  return std::strncmp(a.node, b.node, sizeof a.node) == 0;
}

std::vector<int32_t> PeerPaths::ipc_peers_of(int rank) const {
  std::vector<int32_t> out;
  if (!any_ipc) return out;
  for (int r = 0; r < world_size; ++r)
    if (r == rank || is_ipc(rank, r)) out.push_back(r);
  return out;
}

PeerPaths decide_peer_paths(const std::vector<NodeIdentity>& nodes, const std::vector<uint8_t>& reach) {
  const int R = int(nodes.size());
  if (reach.size() != size_t(R) * R)
    raise(Status::internal, "peer reach matrix of " + std::to_string(reach.size()) + " entries for " +
                                std::to_string(R) + " ranks");
  PeerPaths p;
  p.world_size = R;
  p.ipc.assign(size_t(R) * R, 0);
  for (int a = 0; a < R; ++a) {
    for (int b = 0; b < R; ++b) {
      if (a == b) continue;
      const bool ipc = nodes[a].wants_ipc && nodes[b].wants_ipc && same_node(nodes[a], nodes[b]) &&
                       reach[size_t(a) * R + b] && reach[size_t(b) * R + a];
      p.ipc[size_t(a) * R + b] = ipc ? 1 : 0;
      if (ipc) p.any_ipc = true;
      else p.any_engine = true;
    }
  }
  // A job of one rank moves its records to itself: through the IPC kernels unless IPC is unwanted (or
  // impossible), then through the engine's local copy.
  if (R == 1) {
    p.any_ipc = nodes[0].wants_ipc != 0;
    p.any_engine = !p.any_ipc;
  }
  return p;
}

}  // namespace ferry::cuda
