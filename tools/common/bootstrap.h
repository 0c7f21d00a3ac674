// One rendezvous per tool run: a te::Bootstrap chosen from the launch environment, and the C API's
// ferry_bootstrap_t over that same bootstrap (so ferry_a2a_create and the tool's own gathers share it).
#pragma once
#include <memory>

#include "ferry/ferry.h"
#include "tools/common/env.h"
#include "transfer_engine/bootstrap.h"

namespace ferry::tools {

// MASTER_ADDR/MASTER_PORT present -> TCP bootstrap with env's rank/world (works under torchrun,
// --local-ranks, and srun/mpirun when the user exports them); else an MPI launch -> MPI_COMM_WORLD;
// else a single process (world_size 1) -> a loopback TCP bootstrap of one; else throws
// Status::invalid_argument naming what is missing.
std::unique_ptr<te::Bootstrap> make_bootstrap(const RankEnv& env, int timeout_ms);

// A ferry_bootstrap_t that is `bootstrap` itself (ferry::api::borrow_bootstrap: no C callback in
// between, so the C API's collectives keep the bootstrap's deadlines and error text). Owns the
// handle; `bootstrap` must outlive it and every ferry_a2a_t created from it.
class CBootstrap {
 public:
  explicit CBootstrap(te::Bootstrap& bootstrap);
  ~CBootstrap();
  CBootstrap(const CBootstrap&) = delete;
  CBootstrap& operator=(const CBootstrap&) = delete;
  ferry_bootstrap_t get() const { return handle_; }

 private:
  ferry_bootstrap_t handle_ = nullptr;
};

// Converts a C API status into ferry::Error carrying ferry_last_error()'s text and `what`.
void check(ferry_status_t status, const char* what);

}  // namespace ferry::tools
