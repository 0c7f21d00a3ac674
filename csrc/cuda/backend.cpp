#include "csrc/backend.h"
#include "transfer_engine/error.h"

namespace ferry::ep {

std::unique_ptr<Backend> make_cuda_backend(const ferry_a2a_config_t& config, te::Bootstrap& bootstrap) {
  raise(Status::unsupported, "rank " + std::to_string(config.rank) + ": the CUDA backend's transport is not built yet");
}

}  // namespace ferry::ep
