// Which peers of a CUDA all-to-all are reached through CUDA IPC and which through the transfer
// engine. Pure functions of what every rank tells the others, so every rank computes the same answer.
//
// Two ranks are IPC peers when they run on one node (same host name and boot id: two containers with
// one host name are still two kernels), both want IPC (FERRY_CUDA_IPC is not 0), and each one's GPU
// can map the other's memory (the same GPU, or peer access over NVLink or PCIe). The relation is made
// symmetric on purpose: a pair that writes through IPC one way and through the NIC the other would need
// both mechanisms for one exchange. Every rank is its own IPC peer whenever the job uses IPC at all.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace ferry::cuda {

// What every rank tells the others (fixed size: it travels through the bootstrap's allgather).
struct NodeIdentity {
  char node[112];       // host name and boot id, or FERRY_NODE_ID where set
  char pci_bus_id[32];  // this rank's GPU; empty when unknown (then no IPC for this rank)
  int32_t wants_ipc;
  int32_t pad;
};

// This process's identity: FERRY_NODE_ID (when set and not empty) names the node instead of host name
// and boot id, so that one machine can play several nodes (tests, and containers that share a kernel but
// must not share GPU memory). `pci_bus_id` may be empty.
NodeIdentity make_node_identity(bool wants_ipc, const std::string& pci_bus_id);

bool same_node(const NodeIdentity& a, const NodeIdentity& b);

struct PeerPaths {
  int world_size = 0;
  std::vector<uint8_t> ipc;  // [world_size * world_size]: ipc[a * R + b] = a and b are IPC peers
  bool any_ipc = false;      // some pair of distinct ranks is IPC: every rank exports its regions
  bool any_engine = false;   // some pair of distinct ranks is not: every rank creates the engine
                             // (a job of one rank: exactly one of the two, by its wish)

  bool is_ipc(int a, int b) const { return ipc[size_t(a) * world_size + b] != 0; }
  // Ranks `rank` reaches through IPC, itself included when any_ipc, ascending.
  std::vector<int32_t> ipc_peers_of(int rank) const;
};

// reach[a * R + b]: rank a's GPU can map rank b's memory (only consulted for ranks on one node).
PeerPaths decide_peer_paths(const std::vector<NodeIdentity>& nodes, const std::vector<uint8_t>& reach);

}  // namespace ferry::cuda
