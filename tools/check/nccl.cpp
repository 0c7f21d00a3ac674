// Stage 5: NCCL beside Ferry. Two checks:
//  - an NCCL all-reduce across the job's GPUs, where CUDA, NCCL and a GPU are present, on a
//    communicator made from Ferry's bootstrap (csrc/nccl/communicators.h). NCCL keeps the model's
//    TP/PP collectives, so a node that passes Ferry's checks but cannot all-reduce is not ready;
//  - Ferry's threads and NCCL's on separate cores (csrc/nccl/cores.h): every rank splits its share
//    of its GPU's socket, starts a small all-to-all under Ferry's cores and the communicator under
//    NCCL's, and reads every new thread's mask from /proc. Without NCCL or a GPU, NCCL's side is the
//    cores the split leaves to it. FAIL when a rank's Ferry threads may run on a CPU where NCCL's
//    threads of a rank of the same node may; SKIP when a node has too few cores to split.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>

#include "csrc/nccl/cores.h"
#include "tools/check/check.h"
#include "tools/common/bootstrap.h"
#include "tools/common/launch.h"
#include "tools/common/report.h"
#include "transfer_engine/error.h"
#include "transfer_engine/topology.h"

#if defined(FERRY_CHECK_NCCL)
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "csrc/nccl/communicators.h"
#endif

namespace ferry::check {

namespace {

using Clock = std::chrono::steady_clock;

// The pool a rank's cores come from: near its GPU, else its first NIC, within the CPUs it may use.
std::vector<int> pool_of(const RankInventory& inv) {
  const std::vector<int> allowed = nccl::allowed_cpus();
  try {
    const te::Topology topo = te::Topology::discover();
    const int gpu = inv.gpu >= 0 && size_t(inv.gpu) < inv.host_gpus.size()
                        ? topo.find_gpu(inv.host_gpus[size_t(inv.gpu)].pci_bus_id)
                        : -1;
    return nccl::core_pool(topo, gpu, inv.nics.empty() ? "" : inv.nics.front(), allowed);
  } catch (const Error&) {
    return allowed;
  }
}

// Where the threads of a small all-to-all (an engine worker) start when it is created under Ferry's
// cores. Collective.
std::vector<int> ferry_threads_on(const Options& opt, te::Bootstrap& boot, const std::vector<int>& cores) {
  tools::CBootstrap cboot(boot);
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.rank = boot.rank();
  c.world_size = boot.world_size();
  c.num_experts = boot.world_size();
  c.hidden_dim = 64;
  c.max_tokens_per_rank = 4;
  c.provider = opt.provider.c_str();
  c.timeout_ms = opt.timeout_ms;
  const auto before = nccl::process_threads();
  ferry_a2a_t a2a = nullptr;
  {
    nccl::ScopedAffinity on_ferry_cores(cores);
    tools::check(ferry_a2a_create(&c, cboot.get(), &a2a), "ferry_a2a_create");
  }
  const std::vector<int> cpus = nccl::cpus_of(nccl::new_threads(before, nccl::process_threads()));
  ferry_a2a_destroy(a2a);
  return cpus;
}

#if defined(FERRY_CHECK_NCCL)
std::string cuda_text(cudaError_t e) { return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e); }

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

// The all-reduce on a world communicator created under `nccl_cores`; returns its time and sets
// `nccl_threads` to where NCCL's new threads may run.
double all_reduce(const Options& opt, te::Bootstrap& boot, int gpu, const std::vector<int>& nccl_cores,
                  std::vector<int>& nccl_threads) {
  const int me = boot.rank(), world = boot.world_size();
  const size_t count = size_t(opt.nccl_bytes) / sizeof(float);
  cudaError_t ce = cudaSetDevice(gpu);
  if (ce != cudaSuccess) throw Error(Status::internal, "cudaSetDevice(" + std::to_string(gpu) + "): " + cuda_text(ce));
  Stream stream;
  DeviceBuffer buf;
  if ((ce = cudaStreamCreate(&stream.s)) != cudaSuccess) throw Error(Status::internal, "cudaStreamCreate: " + cuda_text(ce));
  if ((ce = cudaMalloc(&buf.p, count * sizeof(float))) != cudaSuccess)
    throw Error(Status::out_of_memory, "cudaMalloc of " + std::to_string(count * sizeof(float)) + " bytes: " + cuda_text(ce));
  std::vector<float> host(count, float(me + 1));
  cudaMemcpy(buf.p, host.data(), count * sizeof(float), cudaMemcpyHostToDevice);
  const auto before = nccl::process_threads();
  nccl::Communicators comms(boot, {world, world, 1}, gpu, opt.timeout_ms, nccl_cores);
  nccl_threads = nccl::cpus_of(nccl::new_threads(before, nccl::process_threads()));
  nccl::Communicator& comm = comms.tp();
  const auto t0 = Clock::now();
  const ncclResult_t rc = ncclAllReduce(buf.p, buf.p, count, ncclFloat, ncclSum, comm.get(), stream.s);
  if (rc != ncclSuccess && rc != ncclInProgress) throw Error(Status::transport, std::string("ncclAllReduce: ") + ncclGetErrorString(rc));
  comm.wait(stream.s, "ncclAllReduce", opt.timeout_ms);
  const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  cudaMemcpy(host.data(), buf.p, count * sizeof(float), cudaMemcpyDeviceToHost);
  const float want = float(world) * float(world + 1) / 2;
  for (size_t i = 0; i < count; ++i) {
    if (host[i] != want) {
      throw Error(Status::internal, "all-reduce result wrong at element " + std::to_string(i) + ": " +
                                        std::to_string(host[i]) + ", expected " + std::to_string(want));
    }
  }
  return us;
}
#endif

}  // namespace

Share run_nccl(const Options& opt, te::Bootstrap& boot, const std::vector<RankInventory>& all) {
  Share share;
  const int me = boot.rank(), world = boot.world_size();
  const int gather_ms = opt.collective_timeout_ms();
  // One engine worker for the small all-to-all; NCCL keeps the rest of the slice.
  const nccl::CoreSplit split = nccl::plan_core_split(boot, tools::node_label(), pool_of(all[size_t(me)]), 1, gather_ms);
  nccl::RankCores mine;
  mine.rank = me;
  mine.node = tools::node_label();
  std::string cores_error;
  try {
    mine.ferry = ferry_threads_on(opt, boot, split.ferry);
  } catch (const std::exception& e) {
    cores_error = std::string("Ferry's threads: ") + e.what();
    rank_failure(me, "nccl: " + cores_error);
  }

  CheckResult c{"nccl", "all_reduce sum across GPUs", Verdict::skip, "", nlohmann::json::object()};
  bool nccl_measured = false;
#if !defined(FERRY_CHECK_NCCL)
  c.reason = "built without NCCL";
#else
  // Every rank must agree to run before any creates a communicator.
  const int gpu = all[size_t(me)].gpu;
  const std::vector<uint64_t> gpus = tools::allgather_u64(boot, uint64_t(gpu + 1), gather_ms);
  int without = -1;
  for (int r = 0; r < world; ++r)
    if (gpus[size_t(r)] == 0) without = r;
  if (without >= 0) {
    c.reason = "no GPU on rank " + std::to_string(without) + " (" + all[size_t(without)].host + ")";
  } else {
    std::string error;
    double us = -1;
    try {
      us = all_reduce(opt, boot, gpu, split.nccl, mine.other);
      nccl_measured = true;
    } catch (const std::exception& e) {
      error = e.what();
      rank_failure(me, "nccl: " + error);
    }
    const std::vector<std::string> errors = tools::allgather_strings(boot, error, gather_ms);
    const std::vector<double> times = tools::allgather_values(boot, std::vector<double>{us}, gather_ms);
    c.verdict = Verdict::pass;
    for (int r = 0; r < world; ++r) {
      if (!errors[size_t(r)].empty()) {
        c.verdict = Verdict::fail;
        c.reason += (c.reason.empty() ? "" : "; ") + std::string("rank ") + std::to_string(r) + " (" +
                    all[size_t(r)].host + "): " + errors[size_t(r)];
      }
    }
    const double bytes = double(size_t(opt.nccl_bytes) / sizeof(float) * sizeof(float));
    double worst = 0;
    for (double t : times) worst = std::max(worst, t);
    c.metrics = {{"bytes", bytes}, {"us", worst},
                 {"algbw_gbps", worst > 0 ? bytes * 8 / (worst * 1e3) : 0.0},
                 {"busbw_gbps", worst > 0 ? bytes * 8 / (worst * 1e3) * 2 * (world - 1) / world : 0.0}};
  }
#endif
  if (!nccl_measured) mine.other = split.nccl;

  // Ferry's cores against NCCL's, per node.
  const std::vector<nccl::RankCores> ranks = nccl::gather_rank_cores(boot, mine, gather_ms);
  const auto errors = tools::allgather_strings(boot, cores_error, gather_ms);
  const auto notes = tools::allgather_strings(boot, split.disjoint() ? "" : split.note, gather_ms);
  const auto measured = tools::allgather_u64(boot, nccl_measured ? 1 : 0, gather_ms);
  if (me != 0) return share;
  share.checks.push_back(std::move(c));

  CheckResult k{"nccl", "Ferry's threads and NCCL's on separate cores", Verdict::pass, "", nlohmann::json::object()};
  const bool all_measured = std::all_of(measured.begin(), measured.end(), [](uint64_t v) { return v == 1; });
  const std::vector<std::string> collisions =
      nccl::core_collisions(ranks, all_measured ? "NCCL" : "the cores left to NCCL");
  std::vector<std::string> reasons;
  std::string unsplittable;
  for (int r = 0; r < world; ++r) {
    if (!errors[size_t(r)].empty()) reasons.push_back("rank " + std::to_string(r) + ": " + errors[size_t(r)]);
    if (!notes[size_t(r)].empty() && unsplittable.empty())
      unsplittable = "rank " + std::to_string(r) + ": " + notes[size_t(r)];
  }
  if (!reasons.empty()) {
    k.verdict = Verdict::fail;
  } else if (!unsplittable.empty()) {
    k.verdict = Verdict::skip;
    reasons.push_back("too few cores to split: " + unsplittable);
  } else if (!collisions.empty()) {
    k.verdict = Verdict::fail;
    reasons = collisions;
  }
  for (const std::string& r : reasons) k.reason += (k.reason.empty() ? "" : "; ") + r;
  k.metrics["nccl_cores"] = all_measured ? "measured: the threads of the all-reduce's communicator"
                                         : "planned: no NCCL communicator ran, the cores the split leaves to NCCL";
  k.metrics["collisions"] = collisions;
  k.metrics["ranks"] = nlohmann::json::array();
  for (const nccl::RankCores& rc : ranks)
    k.metrics["ranks"].push_back({{"rank", rc.rank}, {"node", rc.node}, {"ferry", nccl::cpu_text(rc.ferry)},
                                  {"nccl", nccl::cpu_text(rc.other)}});
  share.checks.push_back(std::move(k));
  return share;
}

}  // namespace ferry::check
