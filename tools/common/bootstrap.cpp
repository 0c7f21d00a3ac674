#include "tools/common/bootstrap.h"

#include "csrc/api.h"
#include "tools/common/launch.h"
#include "transfer_engine/error.h"

namespace ferry::tools {

std::unique_ptr<te::Bootstrap> make_bootstrap(const RankEnv& env, int timeout_ms) {
  if (env.has_master()) {
    te::TcpBootstrapConfig config;
    config.master_addr = env.master_addr;
    config.master_port = env.master_port;
    config.rank = env.rank;
    config.world_size = env.world_size;
    config.local_rank = env.local_size > 0 ? env.local_rank : -1;
    config.timeout_ms = timeout_ms;
    return te::make_tcp_bootstrap(config);
  }
  if (env.under_mpi()) return te::make_mpi_bootstrap();
  if (env.world_size == 1) {
    te::TcpBootstrapConfig config;
    config.master_addr = "127.0.0.1";
    config.master_port = find_free_port();
    config.rank = 0;
    config.world_size = 1;
    config.local_rank = 0;
    config.timeout_ms = timeout_ms;
    return te::make_tcp_bootstrap(config);
  }
  raise(Status::invalid_argument,
        "rank " + std::to_string(env.rank) + " of " + std::to_string(env.world_size) + " (from " +
            env.source + ") has no rendezvous: set MASTER_ADDR and MASTER_PORT, launch with mpirun, "
            "or use --local-ranks N");
}

void check(ferry_status_t status, const char* what) {
  if (status == FERRY_OK) return;
  raise(static_cast<Status>(status),
        std::string(what) + " failed (" + ferry_status_string(status) + "): " + ferry_last_error());
}

CBootstrap::CBootstrap(te::Bootstrap& bootstrap) : handle_(api::borrow_bootstrap(bootstrap)) {}

CBootstrap::~CBootstrap() {
  if (handle_) ferry_bootstrap_destroy(handle_);
}

}  // namespace ferry::tools
