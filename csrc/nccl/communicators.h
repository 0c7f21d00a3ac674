// NCCL communicators for the tensor- and pipeline-parallel groups of a job, created from Ferry's
// bootstrap, so one launch (torchrun env, mpirun, or the serving stack's own process group through
// ferry_bootstrap_callback) serves both Ferry's all-to-all and NCCL: no second rendezvous.
//
// Creation is one allgather and two non-blocking inits. Each group's leader (its lowest rank) draws
// an ncclUniqueId; every rank contributes [TP id | PP id] (zeros where it leads nothing, and the
// failure text where ncclGetUniqueId failed) and takes its groups' ids from their leaders' entries.
// The inits are non-blocking (ncclConfig_t::blocking = 0) and polled against the deadline, so a rank
// that never arrives ends in Status::timeout naming the group and its ranks, not in a hang; a failed
// communicator is aborted, never destroyed while it may still wait for a peer.
//
// NCCL's threads start on `nccl_cpus` when given (cores.h: the calling thread's mask is narrowed
// while NCCL initialises, and NCCL keeps its threads within it).
//
// Built when NCCL and CUDA are found (FERRY_HAVE_NCCL).
#pragma once
#include <nccl.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "csrc/nccl/groups.h"
#include "ferry/ferry.h"
#include "transfer_engine/bootstrap.h"

namespace ferry::nccl {

class Communicator {
 public:
  Communicator() = default;
  ~Communicator();
  Communicator(Communicator&& other) noexcept;
  Communicator& operator=(Communicator&& other) noexcept;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  ncclComm_t get() const { return comm_; }
  const Group& group() const { return group_; }
  const std::string& name() const { return name_; }  // "TP group 1 (ranks 4-7)"

  // Polls the communicator until its pending work was issued, then `stream` (a cudaStream_t; may
  // be null) until it finished, both within timeout_ms. Throws ferry::Error naming `what`, the group
  // and NCCL's text (Status::transport) or the deadline (Status::timeout); the communicator is
  // aborted then.
  void wait(void* stream, const std::string& what, int timeout_ms);

 private:
  friend class Communicators;
  void wait_until(std::chrono::steady_clock::time_point deadline, void* stream, const std::string& what);
  ncclComm_t comm_ = nullptr;
  Group group_;
  std::string name_;
  bool aborted_ = false;
};

class Communicators {
 public:
  // Collective over `bootstrap`. cuda_device: the GPU this rank drives (cudaSetDevice is called).
  // layout.world_size is taken from the bootstrap. Throws Status::invalid_argument for a layout that
  // does not fit the world size.
  Communicators(te::Bootstrap& bootstrap, const ParallelLayout& layout, int cuda_device, int timeout_ms,
                const std::vector<int>& nccl_cpus = {});
  // The same over the C API's bootstrap (ferry_bootstrap_allgather): what a serving stack that
  // created its all-to-all from a ferry_bootstrap_t holds.
  Communicators(ferry_bootstrap_t bootstrap, const ParallelLayout& layout, int cuda_device, int timeout_ms,
                const std::vector<int>& nccl_cpus = {});

  Communicator& tp() { return tp_; }
  Communicator& pp() { return pp_; }
  const Communicator& tp() const { return tp_; }
  const Communicator& pp() const { return pp_; }

 private:
  // out[world * bytes] = every rank's `in`, rank-major.
  using Allgather = std::function<void(const void* in, size_t bytes, void* out)>;
  void create(int rank, int world_size, const Allgather& allgather, const ParallelLayout& layout, int cuda_device,
              int timeout_ms, const std::vector<int>& nccl_cpus);
  Communicator tp_, pp_;
};

}  // namespace ferry::nccl
