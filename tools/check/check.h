// ferry-check's stages. Every stage runs on every rank, bounded by deadlines, and returns this
// rank's share of the report; the driver (main.cpp) gathers the shares on rank 0 between stages.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "tools/check/report.h"
#include "transfer_engine/bootstrap.h"
#include "transfer_engine/engine.h"

namespace ferry::check {

struct Options {
  std::string provider = "tcp";
  // NICs (libfabric domains) of every host, in slot order; empty: what the provider lists (without
  // "lo" when the host has other interfaces). The ranks of a host split them between themselves.
  std::vector<std::string> nics;
  int nics_per_rank = 0;              // 0: host NICs / ranks on the host, at least 1
  int expect_nics_per_node = 0;       // 0: no expectation
  int local_nodes = 0;                // --local-nodes of the launch (0: none); the report says so
  int timeout_ms = 10000;             // every wait of every check
  // links
  bool run_links = true;
  int latency_iters = 200;
  int latency_bytes = 8;
  int bw_bytes = 1 << 20;
  int bw_iters = 8;
  int bw_reps = 3;                    // bursts of bw_iters writes; the fastest counts
  double min_gbps = 0;                // 0: no absolute floor
  double outlier_ratio = 0.5;         // a link below this fraction of the median of its kind is slow
  int loopback_bytes = 1 << 20;
  // all-to-all
  bool run_alltoall = true;
  int a2a_tokens = 64;                // decode shape; the wide shape uses a quarter
  int a2a_decode_hidden = 2048;
  int a2a_wide_hidden = 7168;
  int a2a_iters = 10;
  int a2a_warmup = 2;
  double max_dispatch_us = 0;         // 0: no limit
  double max_combine_us = 0;
  uint64_t seed = 1;
  // Which backend runs the all-to-all: "host", "cuda" (every rank's GPU; FAIL where a rank has none
  // or the build lacks the CUDA backend) or "auto" (cuda when every rank can, else host).
  std::string a2a_device = "auto";
  // nccl
  bool run_nccl = true;
  int nccl_bytes = 64 << 20;
  // output
  std::string json_path;
  std::string html_path;
  bool topo_only = false;
  bool quiet = false;
  // Testing the checker itself: rank debug_die_rank SIGKILLs itself (or stops answering, without
  // exiting) when the named stage starts.
  std::string debug_die_at;
  std::string debug_hang_at;
  int debug_die_rank = -1;

  // Deadline of a step all ranks take together (a gather, a round barrier): the slowest rank may
  // still be spending up to `waits` failed waits of timeout_ms before it arrives, and that is
  // not yet a reason to call it lost.
  int collective_timeout_ms(int waits = 2) const { return (waits + 1) * timeout_ms + 5000; }
};

// What one rank contributes after a stage; merged on rank 0.
struct Share {
  std::vector<CheckResult> checks;
  std::vector<LinkResult> links;
  std::vector<AlltoallResult> alltoall;
  std::vector<RankInventory> inventory;
  nlohmann::json to_json() const;
  static Share from_json(const nlohmann::json& j);
};

// Progress lines: rank 0 prints what the whole job does; every rank prints its own failures at once,
// so a failure is visible even when the gather that would carry it never happens.
void progress(int rank, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void rank_failure(int rank, const std::string& what);
void set_quiet(bool quiet);

// --- inventory ----------------------------------------------------------------------------------
RankInventory collect_inventory(const Options& opt, const te::Bootstrap& boot);
// Node-level verdicts from every rank's inventory (run on rank 0): NIC counts against
// --expect-nics-per-node, requested NICs missing, ranks sharing a NIC although the host has enough,
// NICs far from their GPU.
std::vector<CheckResult> judge_inventory(const Options& opt, const std::vector<RankInventory>& all);

// --- NICs and links -----------------------------------------------------------------------------
// One engine per NIC slot (nets_per_rank = 1), so each measurement names exactly one NIC. A rank
// without a NIC for a slot still joins that slot's engine (the engine setup is collective) through a
// NIC it has, and its links in that slot are reported as failed without sending anything.
class SlotEngines {
 public:
  SlotEngines(const Options& opt, te::Bootstrap& boot, const std::vector<RankInventory>& all);
  ~SlotEngines();
  int num_slots() const { return int(slots_.size()); }
  struct Slot;
  Slot& slot(int s) { return *slots_[size_t(s)]; }

 private:
  std::vector<std::unique_ptr<Slot>> slots_;
};
int max_slots(const std::vector<RankInventory>& all);
// Whether rank `r` really has its NIC for slot `s` (else the reason).
std::string nic_problem(const RankInventory& inv, int s);

Share run_loopback(const Options& opt, SlotEngines& engines, const std::vector<RankInventory>& all);
Share run_links(const Options& opt, SlotEngines& engines, const std::vector<RankInventory>& all);
// Rank 0: marks slow links and adds one check per slot (and one per bad link).
void judge_links(const Options& opt, Report& report);

// Round-robin tournament (circle method): in round k rank r meets partner(r, k), or -1 (a bye when
// the world size is odd). Every pair meets exactly once in world_size - 1 (even) or world_size (odd)
// rounds; each rank has one partner per round.
int num_rounds(int world_size);
int round_partner(int rank, int round, int world_size);

// --- all-to-all and NCCL ------------------------------------------------------------------------
// The values --a2a-device accepts.
inline const std::vector<std::string>& a2a_device_names() {
  static const std::vector<std::string> names = {"host", "cuda", "auto"};
  return names;
}
Share run_alltoall(const Options& opt, te::Bootstrap& boot, const std::vector<RankInventory>& all);
Share run_nccl(const Options& opt, te::Bootstrap& boot, const std::vector<RankInventory>& all);

}  // namespace ferry::check
