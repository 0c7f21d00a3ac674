// How a rank's CPU cores are split between Ferry's threads (the transfer engine's worker, one per
// all-to-all handle, and the CUDA backend's proxy) and NCCL's (its proxy progress and service
// threads), so that neither busy-polls on the other's core.
//
//   pool   the cores NUMA-local to the rank's GPU (hwloc), else to its first NIC, within the CPUs the
//          process may use; on a host without either (CI, the host backend), the allowed CPUs
//   cores  the pool's CPUs grouped into physical cores (hyperthread siblings, from sysfs), so that
//          Ferry and NCCL never share a core through its two hardware threads
//   slice  the ranks of one host that draw from the same pool split its cores into contiguous
//          slices, in rank order (a node with 8 GPUs on 2 sockets: 4 ranks per socket's cores)
//   split  Ferry takes the first `ferry_cores` cores of the slice (at most all but one), NCCL the rest
//
// Both libraries pin their threads by inheritance: the transfer engine pins its worker to the
// NIC-local cores within the mask of the process's main thread (te::bind_thread_to_cores), and NCCL
// gives its threads the calling thread's mask intersected with the GPU's local cores. So the split is
// applied by narrowing the creating thread's mask while each library starts (ScopedAffinity):
// ferry_a2a_create under `ferry`, ncclCommInitRank under `nccl`. NICs need no split: NCCL and
// Ferry share them as the providers allow (EFA queue pairs are per endpoint).
//
// The split is verified by what the threads got, not by what was asked: process_threads() reads
// every thread's mask from /proc, and the threads a library started are those new after it started.
#pragma once
#include <string>
#include <vector>

#include "transfer_engine/bootstrap.h"
#include "transfer_engine/topology.h"

namespace ferry::nccl {

// CPUs this process may use (its main thread's mask: cgroup cpuset, taskset).
std::vector<int> allowed_cpus();
// The calling thread's mask.
std::vector<int> thread_cpus();

// The cores this rank draws from: NUMA-local to hwloc GPU `gpu` (-1: none), else to NIC `nic`
// (a libfabric domain or OS name; "": none), within `allowed`; `allowed` when neither is known or
// none of their cores is allowed.
std::vector<int> core_pool(const te::Topology& topology, int gpu, const std::string& nic, const std::vector<int>& allowed);

// `cpus` grouped by physical core: each group the CPUs of one core (its hyperthread siblings, read
// from /sys/devices/system/cpu; a CPU whose siblings are unknown is a core of its own), groups in
// order of their first CPU.
std::vector<std::vector<int>> physical_cores(const std::vector<int>& cpus);

struct CoreSplit {
  std::vector<int> pool;   // CPUs the ranks sharing it split
  std::vector<int> slice;  // this rank's part
  std::vector<int> ferry;  // Ferry's worker(s) and proxy
  std::vector<int> nccl;   // NCCL's threads
  int share_index = 0, share_count = 1;
  std::string note;        // why ferry and nccl overlap, or Ferry got fewer cores, when so
  bool disjoint() const;
};

// Pure: this rank's slice `share_index` of `share_count` of the pool's physical `cores`, then the
// split (ferry_cores counted in physical cores). A slice of one core (or a pool with fewer cores
// than ranks) leaves Ferry and NCCL on the same core; `note` says so.
CoreSplit split_cores(const std::vector<std::vector<int>>& cores, int share_index, int share_count, int ferry_cores);

// Collective over `bootstrap`: every rank passes its node (host name or FERRY_NODE_ID) and pool; the
// ranks of a node with the same pool share it in rank order.
CoreSplit plan_core_split(te::Bootstrap& bootstrap, const std::string& node, const std::vector<int>& pool,
                          int ferry_cores, int timeout_ms);

// Narrows the calling thread's mask to `cpus` (those the process may use) for the scope, and restores
// it after. Throws Status::invalid_argument when none of `cpus` is allowed.
class ScopedAffinity {
 public:
  explicit ScopedAffinity(const std::vector<int>& cpus);
  ~ScopedAffinity();
  ScopedAffinity(const ScopedAffinity&) = delete;
  ScopedAffinity& operator=(const ScopedAffinity&) = delete;

 private:
  std::vector<int> saved_;
};

struct ThreadInfo {
  int tid = 0;
  std::string name;       // /proc comm
  std::vector<int> cpus;  // Cpus_allowed_list
};
// Every thread of this process.
std::vector<ThreadInfo> process_threads();
// Threads of `after` that `before` did not have (by tid).
std::vector<ThreadInfo> new_threads(const std::vector<ThreadInfo>& before, const std::vector<ThreadInfo>& after);
// The union of the threads' masks, sorted.
std::vector<int> cpus_of(const std::vector<ThreadInfo>& threads);
// Sorted intersection.
std::vector<int> common_cpus(const std::vector<int>& a, const std::vector<int>& b);
// Where one rank's threads may run, by owner.
struct RankCores {
  int rank = 0;
  std::string node;        // host name or FERRY_NODE_ID
  std::vector<int> ferry;  // union of the masks of Ferry's threads
  std::vector<int> other;  // union of the masks of the other library's threads (NCCL's, or the GEMM's)
};
// Collective: every rank's RankCores, in rank order.
std::vector<RankCores> gather_rank_cores(te::Bootstrap& bootstrap, const RankCores& mine, int timeout_ms);
// Every pair of ranks of one node (a rank with itself included) where Ferry's threads of one may run
// on a CPU where `other_name`'s threads of the other may: one line each, naming both ranks, the node
// and the shared CPUs. Empty when the node's Ferry and other cores are disjoint.
std::vector<std::string> core_collisions(const std::vector<RankCores>& ranks, const std::string& other_name);

// "0-3,8" (te::format_cpu_list), "-" when empty.
std::string cpu_text(const std::vector<int>& cpus);

}  // namespace ferry::nccl
