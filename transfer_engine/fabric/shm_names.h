// Names of the shm provider's endpoints. shm keeps each endpoint's region in /dev/shm under the
// endpoint's name; libfabric's default name is pid-based, so a killed process's leftover region makes
// a later process that reuses the pid fail fi_enable with EBUSY. Ferry names them
// "<kShmNamePrefix><pid>-<random>-<nic>", and launchers remove what a killed rank left behind.
// No libfabric here: launchers link this without loading libfabric (whose Debian build pulls in
// libpsm, which installs its own crash-signal handlers at load time).
#pragma once
#include <string>

namespace ferry::te::fabric {

inline constexpr char kShmNamePrefix[] = "ferry-";

std::string shm_endpoint_name(int nic_index);

// Removes the shm regions of process `pid`, which must have exited.
void remove_shm_regions_of(int pid);

}  // namespace ferry::te::fabric
