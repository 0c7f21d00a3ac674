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

namespace ferry::tools {

std::optional<int> parse_int(const std::string& text) {
  int value = 0;
  const char* end = text.data() + text.size();
  auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (text.empty() || ec != std::errc() || ptr != end) return std::nullopt;
  return value;
}

std::map<std::string, std::string> environment_map() { return te::process_environment(); }

RankEnv discover_rank_env(const std::map<std::string, std::string>& vars) {
  return te::read_launch_env(vars);
}

RankEnv discover_rank_env() { return te::read_launch_env(); }

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
