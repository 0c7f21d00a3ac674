#include "transfer_engine/fabric/shm_names.h"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <random>
#include <system_error>

namespace ferry::te::fabric {

std::string shm_endpoint_name(int nic_index) {
  std::random_device entropy;
  const uint64_t nonce = (uint64_t(entropy()) << 32) | entropy();
  char name[64];
  std::snprintf(name, sizeof(name), "%s%d-%016llx-%d", kShmNamePrefix, static_cast<int>(getpid()),
                static_cast<unsigned long long>(nonce), nic_index);
  return name;
}

void remove_shm_regions_of(int pid) {
  if (pid <= 0) return;
  const std::string prefix = std::string(kShmNamePrefix) + std::to_string(pid) + "-";
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/dev/shm", ec)) {
    if (entry.path().filename().string().rfind(prefix, 0) == 0) std::filesystem::remove(entry.path(), ec);
  }
}

}  // namespace ferry::te::fabric
