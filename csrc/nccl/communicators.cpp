#include "csrc/nccl/communicators.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <memory>
#include <optional>
#include <thread>

#include "csrc/nccl/cores.h"
#include "transfer_engine/error.h"

namespace ferry::nccl {

namespace {

using Clock = std::chrono::steady_clock;

// One rank's contribution to the id exchange.
struct IdEntry {
  uint32_t has_tp = 0, has_pp = 0;  // this rank leads a group and drew its id
  char error[120] = {};             // why a leader has no id
  ncclUniqueId tp{}, pp{};
};

std::string ranks_text(const std::vector<int>& ranks) {
  if (ranks.size() > 1 && ranks.back() - ranks.front() == int(ranks.size()) - 1)
    return std::to_string(ranks.front()) + "-" + std::to_string(ranks.back());
  std::string s;
  for (int r : ranks) s += (s.empty() ? "" : ",") + std::to_string(r);
  return s;
}

std::string group_name(const char* kind, const Group& g) {
  return std::string(kind) + " group " + std::to_string(g.id) + " (ranks " + ranks_text(g.ranks) + ")";
}

}  // namespace

Communicator::~Communicator() {
  if (!comm_) return;
  if (aborted_) ncclCommAbort(comm_);
  else ncclCommDestroy(comm_);
}

Communicator::Communicator(Communicator&& o) noexcept { *this = std::move(o); }

Communicator& Communicator::operator=(Communicator&& o) noexcept {
  if (this != &o) {
    std::swap(comm_, o.comm_);
    std::swap(group_, o.group_);
    std::swap(name_, o.name_);
    std::swap(aborted_, o.aborted_);
  }
  return *this;
}

void Communicator::wait(void* stream, const std::string& what, int timeout_ms) {
  wait_until(Clock::now() + std::chrono::milliseconds(timeout_ms), stream, what);
}

void Communicator::wait_until(Clock::time_point deadline, void* stream, const std::string& what) {
  if (aborted_) raise(Status::internal, name_ + ": " + what + " on a communicator aborted after an earlier failure");
  auto fail = [&](Status status, const std::string& text) {
    aborted_ = true;
    raise(status, what + " on NCCL " + name_ + ": " + text);
  };
  for (;;) {
    ncclResult_t state = ncclSuccess;
    if (const ncclResult_t rc = ncclCommGetAsyncError(comm_, &state); rc != ncclSuccess) state = rc;
    if (state != ncclSuccess && state != ncclInProgress)
      fail(Status::transport, std::string(ncclGetErrorString(state)) + " (" + ncclGetLastError(comm_) + ")");
    if (state == ncclSuccess) {
      if (!stream) return;
      const cudaError_t ce = cudaStreamQuery(static_cast<cudaStream_t>(stream));
      if (ce == cudaSuccess) return;
      if (ce != cudaErrorNotReady) fail(Status::internal, std::string("stream: ") + cudaGetErrorString(ce));
    }
    if (Clock::now() > deadline)
      fail(Status::timeout, "not finished within the deadline: a rank of the group is missing or hung");
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

Communicators::Communicators(te::Bootstrap& boot, const ParallelLayout& layout, int cuda_device, int timeout_ms,
                             const std::vector<int>& nccl_cpus) {
  create(
      boot.rank(), boot.world_size(),
      [&](const void* in, size_t bytes, void* out) { boot.allgather(in, bytes, out, timeout_ms); }, layout,
      cuda_device, timeout_ms, nccl_cpus);
}

Communicators::Communicators(ferry_bootstrap_t boot, const ParallelLayout& layout, int cuda_device, int timeout_ms,
                             const std::vector<int>& nccl_cpus) {
  auto check = [](ferry_status_t st, const char* what) {
    if (st != FERRY_OK) raise(static_cast<Status>(st), std::string(what) + ": " + ferry_last_error());
  };
  int rank = 0, world = 0;
  check(ferry_bootstrap_rank(boot, &rank), "ferry_bootstrap_rank");
  check(ferry_bootstrap_world_size(boot, &world), "ferry_bootstrap_world_size");
  create(
      rank, world,
      [&](const void* in, size_t bytes, void* out) {
        check(ferry_bootstrap_allgather(boot, in, bytes, out, timeout_ms), "ferry_bootstrap_allgather of the NCCL ids");
      },
      layout, cuda_device, timeout_ms, nccl_cpus);
}

void Communicators::create(int me, int world, const Allgather& allgather, const ParallelLayout& layout_in,
                           int cuda_device, int timeout_ms, const std::vector<int>& nccl_cpus) {
  ParallelLayout layout = layout_in;
  layout.world_size = world;
  if (const std::string bad = check_layout(layout); !bad.empty()) raise(Status::invalid_argument, "NCCL groups: " + bad);
  tp_.group_ = tp_group(layout, me);
  pp_.group_ = pp_group(layout, me);
  tp_.name_ = group_name("TP", tp_.group_);
  pp_.name_ = group_name("PP", pp_.group_);

  IdEntry mine;
  auto draw = [&](const Group& g, ncclUniqueId& id, uint32_t& has) {
    if (g.leader() != me) return;
    if (const ncclResult_t rc = ncclGetUniqueId(&id); rc != ncclSuccess) {
      std::snprintf(mine.error, sizeof(mine.error), "ncclGetUniqueId: %s", ncclGetErrorString(rc));
      return;
    }
    has = 1;
  };
  draw(tp_.group_, mine.tp, mine.has_tp);
  draw(pp_.group_, mine.pp, mine.has_pp);
  std::vector<IdEntry> all(static_cast<size_t>(world));
  allgather(&mine, sizeof mine, all.data());

  if (const cudaError_t ce = cudaSetDevice(cuda_device); ce != cudaSuccess)
    raise(Status::internal, "cudaSetDevice(" + std::to_string(cuda_device) + "): " + cudaGetErrorString(ce));
  std::optional<ScopedAffinity> affinity;
  if (!nccl_cpus.empty()) affinity.emplace(nccl_cpus);
  const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
  auto init = [&](Communicator& c, uint32_t IdEntry::*has, ncclUniqueId IdEntry::*id) {
    const IdEntry& leader = all[size_t(c.group_.leader())];
    if (!(leader.*has))
      raise(Status::peer_failed, "NCCL " + c.name_ + ": its leader, rank " + std::to_string(c.group_.leader()) +
                                     ", has no unique id (" + std::string(leader.error, strnlen(leader.error, sizeof leader.error)) + ")");
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t rc =
        ncclCommInitRankConfig(&c.comm_, int(c.group_.ranks.size()), leader.*id, c.group_.index, &config);
    if (rc != ncclSuccess && rc != ncclInProgress) {
      if (c.comm_) c.aborted_ = true;
      raise(Status::transport, "ncclCommInitRankConfig for " + c.name_ + ": " + ncclGetErrorString(rc));
    }
    c.wait_until(deadline, nullptr, "ncclCommInitRankConfig");
  };
  // Every rank initialises TP then PP: the TP groups are disjoint, so no rank waits in TP for one
  // that is already in PP.
  init(tp_, &IdEntry::has_tp, &IdEntry::tp);
  init(pp_, &IdEntry::has_pp, &IdEntry::pp);
}

}  // namespace ferry::nccl
