#include "tools/common/env.h"

#include <rdma/fabric.h>
#include <hwloc.h>
#include <unistd.h>

#include <charconv>
#include <ctime>
#include <cstring>
#include <fstream>
#include <memory>
#include <set>
#include <thread>

#include "ferry/ferry.h"
#include "transfer_engine/error.h"

#if defined(FERRY_HAVE_CUDA)
#include <cuda_runtime_api.h>
#endif

extern "C" char** environ;

namespace ferry::tools {

const char* launcher_name(Launcher l) {
  switch (l) {
    case Launcher::none: return "none";
    case Launcher::mpi: return "mpi";
    case Launcher::slurm: return "slurm";
    case Launcher::torchrun: return "torchrun";
  }
  return "unknown";
}

std::optional<int> parse_int(const std::string& text) {
  int value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return value;
}

std::map<std::string, std::string> environment_map() {
  std::map<std::string, std::string> vars;
  for (char** e = environ; e && *e; ++e) {
    std::string kv(*e);
    const auto eq = kv.find('=');
    if (eq == std::string::npos) continue;
    vars.emplace(kv.substr(0, eq), kv.substr(eq + 1));
  }
  return vars;
}

namespace {

class VarReader {
 public:
  explicit VarReader(const std::map<std::string, std::string>& vars) : vars_(vars) {}
  bool has(const char* name) const { return vars_.count(name) != 0; }
  std::optional<int> get_int(const char* name) const {
    auto it = vars_.find(name);
    if (it == vars_.end()) return std::nullopt;
    auto v = parse_int(it->second);
    if (!v) {
      raise(Status::invalid_argument,
            std::string("environment variable ") + name + "='" + it->second + "' is not an integer");
    }
    return v;
  }
  std::string get(const char* name) const {
    auto it = vars_.find(name);
    return it == vars_.end() ? std::string() : it->second;
  }

 private:
  const std::map<std::string, std::string>& vars_;
};

// Slurm writes tasks per node as "4(x2),3": the count of the first node is enough for a
// homogeneous job; anything else leaves local_size unknown for the bootstrap to derive.
int slurm_first_tasks_per_node(const std::string& spec) {
  const auto end = spec.find_first_of("(,");
  auto v = parse_int(spec.substr(0, end));
  return v ? *v : -1;
}

}  // namespace

std::string first_slurm_host(const std::string& nodelist) {
  // "node[03-05,9],gpu7" -> "node03"; "a1,b2" -> "a1"; "host" -> "host".
  const auto bracket = nodelist.find('[');
  const auto comma = nodelist.find(',');
  if (bracket == std::string::npos || (comma != std::string::npos && comma < bracket)) {
    return nodelist.substr(0, comma);
  }
  const auto end = nodelist.find_first_of("-,]", bracket + 1);
  if (end == std::string::npos) return {};
  return nodelist.substr(0, bracket) + nodelist.substr(bracket + 1, end - bracket - 1);
}

RankEnv discover_rank_env(const std::map<std::string, std::string>& vars) {
  VarReader env(vars);
  RankEnv out;
  std::optional<int> rank, world, local_rank, local_size;
  if (env.has("OMPI_COMM_WORLD_RANK")) {
    out.launcher = Launcher::mpi;
    out.source = "OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK";
    rank = env.get_int("OMPI_COMM_WORLD_RANK");
    world = env.get_int("OMPI_COMM_WORLD_SIZE");
    local_rank = env.get_int("OMPI_COMM_WORLD_LOCAL_RANK");
    local_size = env.get_int("OMPI_COMM_WORLD_LOCAL_SIZE");
  } else if (env.has("PMIX_RANK") || env.has("PMI_RANK")) {
    out.launcher = Launcher::mpi;
    const bool pmix = env.has("PMIX_RANK");
    out.source = pmix ? "PMIX_RANK" : "PMI_RANK/PMI_SIZE";
    rank = env.get_int(pmix ? "PMIX_RANK" : "PMI_RANK");
    // PMIx publishes no size variable; srun and MPICH's hydra do.
    world = env.get_int("PMI_SIZE");
    if (!world) world = env.get_int("SLURM_NTASKS");
    if (!world) world = env.get_int("WORLD_SIZE");
    local_rank = env.get_int("MPI_LOCALRANKID");
    if (!local_rank) local_rank = env.get_int("SLURM_LOCALID");
    local_size = env.get_int("MPI_LOCALNRANKS");
    if (!world && !pmix) {
      raise(Status::invalid_argument, "PMI_RANK is set but PMI_SIZE is not");
    }
  } else if (env.has("SLURM_PROCID") && env.has("SLURM_NTASKS") && !env.has("RANK")) {
    out.launcher = Launcher::slurm;
    out.source = "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID";
    rank = env.get_int("SLURM_PROCID");
    world = env.get_int("SLURM_NTASKS");
    local_rank = env.get_int("SLURM_LOCALID");
    if (env.has("SLURM_TASKS_PER_NODE")) {
      const int n = slurm_first_tasks_per_node(env.get("SLURM_TASKS_PER_NODE"));
      if (n > 0) local_size = n;
    }
  } else if (env.has("RANK") || env.has("WORLD_SIZE")) {
    out.launcher = Launcher::torchrun;
    out.source = "RANK/WORLD_SIZE/LOCAL_RANK";
    rank = env.get_int("RANK");
    world = env.get_int("WORLD_SIZE");
    local_rank = env.get_int("LOCAL_RANK");
    local_size = env.get_int("LOCAL_WORLD_SIZE");
    if (!rank) raise(Status::invalid_argument, "WORLD_SIZE is set but RANK is not");
    if (!world) raise(Status::invalid_argument, "RANK is set but WORLD_SIZE is not");
  }
  out.master_addr = env.get("MASTER_ADDR");
  if (auto port = env.get_int("MASTER_PORT")) {
    if (*port <= 0 || *port > 65535) {
      raise(Status::invalid_argument, "MASTER_PORT=" + std::to_string(*port) + " is not a TCP port");
    }
    out.master_port = *port;
  }
  if (out.launcher == Launcher::none) return out;
  // srun without MPI and without a rendezvous: rank 0 runs on the first node of the step, and every
  // rank can compute the same port from the job and step ids.
  if (out.launcher == Launcher::slurm && out.master_addr.empty()) {
    const std::string nodes = env.has("SLURM_STEP_NODELIST") ? env.get("SLURM_STEP_NODELIST")
                                                             : env.get("SLURM_JOB_NODELIST");
    const auto job = env.get_int("SLURM_JOB_ID");
    if (!nodes.empty() && job) {
      out.master_addr = first_slurm_host(nodes);
      out.master_port = 20000 + (*job * 31 + env.get_int("SLURM_STEP_ID").value_or(0)) % 20000;
      out.source += " (rendezvous: first node of SLURM_STEP_NODELIST, port from SLURM_JOB_ID)";
    }
  }

  out.rank = rank.value_or(0);
  out.world_size = world.value_or(1);
  if (out.world_size < 1) {
    raise(Status::invalid_argument,
          "world size " + std::to_string(out.world_size) + " from " + out.source + " is not positive");
  }
  if (out.rank < 0 || out.rank >= out.world_size) {
    raise(Status::invalid_argument, "rank " + std::to_string(out.rank) + " from " + out.source +
                                        " is outside [0, " + std::to_string(out.world_size) + ")");
  }
  out.local_rank = local_rank.value_or(out.world_size == 1 ? 0 : -1);
  out.local_size = local_size.value_or(-1);
  if (out.local_size > 0 && (out.local_rank < 0 || out.local_rank >= out.local_size)) {
    raise(Status::invalid_argument, "local rank " + std::to_string(out.local_rank) + " from " +
                                        out.source + " is outside [0, " +
                                        std::to_string(out.local_size) + ")");
  }
  return out;
}

RankEnv discover_rank_env() { return discover_rank_env(environment_map()); }

namespace {

std::string read_cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        auto v = line.substr(colon + 1);
        v.erase(0, v.find_first_not_of(' '));
        return v;
      }
    }
  }
  return "unknown";
}

struct FiInfoDeleter {
  void operator()(fi_info* p) const { fi_freeinfo(p); }
};
using FiInfoPtr = std::unique_ptr<fi_info, FiInfoDeleter>;

std::vector<std::string> list_nics(const std::string& provider) {
  std::unique_ptr<fi_info, FiInfoDeleter> hints(fi_allocinfo());
  if (!hints) return {};
  hints->ep_attr->type = FI_EP_RDM;
  hints->caps = FI_RMA;
  if (!provider.empty()) hints->fabric_attr->prov_name = strdup(provider.c_str());
  fi_info* raw = nullptr;
  if (fi_getinfo(FI_VERSION(1, 17), nullptr, nullptr, 0, hints.get(), &raw) != 0) return {};
  FiInfoPtr list(raw);
  std::vector<std::string> out;
  std::set<std::string> seen;
  for (fi_info* i = list.get(); i; i = i->next) {
    std::string name = std::string(i->fabric_attr->prov_name ? i->fabric_attr->prov_name : "?") +
                       ":" + (i->domain_attr->name ? i->domain_attr->name : "?");
    if (seen.insert(name).second) out.push_back(name);
  }
  return out;
}

}  // namespace

HostInfo collect_host_info(const std::string& provider) {
  HostInfo info;
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  info.hostname = host;
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char date[32];
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", &tm);
  info.date_utc = date;
  info.ferry_version = std::to_string(FERRY_VERSION_MAJOR) + "." + std::to_string(FERRY_VERSION_MINOR);
  const uint32_t fv = fi_version();
  info.libfabric_version = std::to_string(FI_MAJOR(fv)) + "." + std::to_string(FI_MINOR(fv));
  const unsigned hv = hwloc_get_api_version();
  info.hwloc_version = std::to_string(hv >> 16) + "." + std::to_string((hv >> 8) & 0xff) + "." +
                       std::to_string(hv & 0xff);
  info.cpu_model = read_cpu_model();
  info.num_cpus = static_cast<int>(std::thread::hardware_concurrency());
  info.nics = list_nics(provider);
#if defined(FERRY_HAVE_CUDA)
  int driver = 0;
  if (cudaDriverGetVersion(&driver) == cudaSuccess && driver > 0) {
    info.cuda_driver_version = std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10);
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) == cudaSuccess) {
    for (int d = 0; d < count; ++d) {
      cudaDeviceProp prop{};
      if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
      info.gpus.push_back(std::string(prop.name) + " (sm_" + std::to_string(prop.major) +
                          std::to_string(prop.minor) + ", " +
                          std::to_string(prop.totalGlobalMem >> 30) + " GiB)");
    }
  } else {
    cudaGetLastError();  // no GPU here: clear the sticky error so later CUDA calls start clean
  }
#endif
  return info;
}

}  // namespace ferry::tools
