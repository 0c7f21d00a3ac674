// Stage 5: an NCCL all-reduce across the job's GPUs, where CUDA, NCCL and a GPU are present. NCCL
// keeps the model's TP/PP collectives, so a node that passes Ferry's checks but cannot all-reduce is
// still not ready. The communicator is non-blocking so that a dead peer ends in a timeout, not a hang.
#include <chrono>
#include <cstring>
#include <thread>

#include "tools/check/check.h"
#include "tools/common/report.h"

#if defined(FERRY_CHECK_NCCL)
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif

namespace ferry::check {

#if defined(FERRY_CHECK_NCCL)
namespace {

using Clock = std::chrono::steady_clock;

struct Comm {
  ncclComm_t comm = nullptr;
  bool aborted = false;
  ~Comm() {
    if (!comm) return;
    if (aborted) ncclCommAbort(comm);
    else ncclCommDestroy(comm);
  }
};

struct DeviceBuffer {
  void* p = nullptr;
  ~DeviceBuffer() {
    if (p) cudaFree(p);
  }
};

struct Stream {
  cudaStream_t s = nullptr;
  ~Stream() {
    if (s) cudaStreamDestroy(s);
  }
};

std::string cuda_text(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

// Polls the communicator until its pending operation finished or the deadline passed.
void wait_comm(Comm& c, Clock::time_point deadline, const std::string& what) {
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t rc = ncclCommGetAsyncError(c.comm, &state);
    if (rc != ncclSuccess) state = rc;
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      c.aborted = true;
      throw Error(Status::transport, what + ": " + ncclGetErrorString(state) + " (" + ncclGetLastError(c.comm) + ")");
    }
    if (Clock::now() > deadline) {
      c.aborted = true;
      throw Error(Status::timeout, what + " did not finish within the deadline (a peer rank is missing or hung)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace
#endif

Share run_nccl(const Options& opt, te::Bootstrap& boot, const std::vector<RankInventory>& all) {
  Share share;
  const int me = boot.rank();
  CheckResult c{"nccl", "all_reduce sum across GPUs", Verdict::skip, "", nlohmann::json::object()};
#if !defined(FERRY_CHECK_NCCL)
  c.reason = "built without NCCL";
#else
  // Every rank must agree to run before any creates a communicator.
  const int gpu = all[size_t(me)].gpu;
  const std::vector<uint64_t> gpus = tools::allgather_u64(boot, uint64_t(gpu + 1), opt.collective_timeout_ms());
  int without = -1;
  for (int r = 0; r < boot.world_size(); ++r)
    if (gpus[size_t(r)] == 0) without = r;
  if (without >= 0) {
    c.reason = "no GPU on rank " + std::to_string(without) + " (" + all[size_t(without)].host + ")";
  } else {
    // The unique id comes from rank 0; the others' contributions are ignored.
    ncclUniqueId id{};
    std::string error;
    if (me == 0 && ncclGetUniqueId(&id) != ncclSuccess) error = "ncclGetUniqueId failed";
    std::vector<ncclUniqueId> ids(size_t(boot.world_size()));
    boot.allgather(&id, sizeof id, ids.data(), opt.collective_timeout_ms());
    id = ids[0];
    const size_t count = size_t(opt.nccl_bytes) / sizeof(float);
    const int world = boot.world_size();
    double us = -1;
    try {
      if (!error.empty()) throw Error(Status::internal, error);
      cudaError_t ce = cudaSetDevice(gpu);
      if (ce != cudaSuccess) throw Error(Status::internal, "cudaSetDevice(" + std::to_string(gpu) + "): " + cuda_text(ce));
      Stream stream;
      DeviceBuffer buf;
      if ((ce = cudaStreamCreate(&stream.s)) != cudaSuccess) throw Error(Status::internal, "cudaStreamCreate: " + cuda_text(ce));
      if ((ce = cudaMalloc(&buf.p, count * sizeof(float))) != cudaSuccess)
        throw Error(Status::out_of_memory, "cudaMalloc of " + std::to_string(count * sizeof(float)) + " bytes: " + cuda_text(ce));
      std::vector<float> host(count, float(me + 1));
      cudaMemcpy(buf.p, host.data(), count * sizeof(float), cudaMemcpyHostToDevice);
      Comm comm;
      ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
      config.blocking = 0;
      const auto deadline = Clock::now() + std::chrono::milliseconds(opt.timeout_ms);
      ncclResult_t rc = ncclCommInitRankConfig(&comm.comm, world, id, me, &config);
      if (rc != ncclSuccess && rc != ncclInProgress) throw Error(Status::transport, std::string("ncclCommInitRankConfig: ") + ncclGetErrorString(rc));
      wait_comm(comm, deadline, "ncclCommInitRank");
      const auto t0 = Clock::now();
      rc = ncclAllReduce(buf.p, buf.p, count, ncclFloat, ncclSum, comm.comm, stream.s);
      if (rc != ncclSuccess && rc != ncclInProgress) throw Error(Status::transport, std::string("ncclAllReduce: ") + ncclGetErrorString(rc));
      wait_comm(comm, deadline, "ncclAllReduce enqueue");
      while ((ce = cudaStreamQuery(stream.s)) == cudaErrorNotReady) {
        wait_comm(comm, deadline, "ncclAllReduce");
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      if (ce != cudaSuccess) throw Error(Status::transport, "all-reduce stream: " + cuda_text(ce));
      us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
      cudaMemcpy(host.data(), buf.p, count * sizeof(float), cudaMemcpyDeviceToHost);
      const float want = float(world) * float(world + 1) / 2;
      for (size_t i = 0; i < count; ++i) {
        if (host[i] != want) {
          throw Error(Status::internal, "all-reduce result wrong at element " + std::to_string(i) + ": " +
                                            std::to_string(host[i]) + ", expected " + std::to_string(want));
        }
      }
    } catch (const std::exception& e) {
      error = e.what();
      rank_failure(me, "nccl: " + error);
    }
    const std::vector<std::string> errors = tools::allgather_strings(boot, error, opt.collective_timeout_ms());
    const std::vector<double> times = tools::allgather_values(boot, std::vector<double>{us}, opt.collective_timeout_ms());
    c.verdict = Verdict::pass;
    for (int r = 0; r < world; ++r) {
      if (!errors[size_t(r)].empty()) {
        c.verdict = Verdict::fail;
        c.reason += (c.reason.empty() ? "" : "; ") + std::string("rank ") + std::to_string(r) + " (" +
                    all[size_t(r)].host + "): " + errors[size_t(r)];
      }
    }
    double worst = 0;
    for (double t : times) worst = std::max(worst, t);
    c.metrics = {{"bytes", count * sizeof(float)}, {"us", worst},
                 {"algbw_gbps", worst > 0 ? double(count * sizeof(float)) * 8 / (worst * 1e3) : 0.0},
                 {"busbw_gbps", worst > 0 ? double(count * sizeof(float)) * 8 / (worst * 1e3) * 2 * (world - 1) / world : 0.0}};
  }
#endif
  if (me == 0) share.checks.push_back(std::move(c));
  return share;
}

}  // namespace ferry::check
