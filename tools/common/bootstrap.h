// One rendezvous per tool run: a te::Bootstrap chosen from the launch environment, and the C API's
// ferry_bootstrap_t layered on it (so ferry_a2a_create and the tool's own gathers share it).
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

// A ferry_bootstrap_t whose allgather is `bootstrap`'s (through ferry_bootstrap_callback). Owns the
// handle; `bootstrap` must outlive it.
class CBootstrap {
 public:
  CBootstrap(te::Bootstrap& bootstrap, int timeout_ms);
  ~CBootstrap();
  CBootstrap(const CBootstrap&) = delete;
  CBootstrap& operator=(const CBootstrap&) = delete;
  ferry_bootstrap_t get() const { return handle_; }

 private:
  struct Context {
    te::Bootstrap* bootstrap;
    int timeout_ms;
  };
  static int allgather(void* context, const void* in, size_t bytes, void* out);
  std::unique_ptr<Context> context_;
  ferry_bootstrap_t handle_ = nullptr;
};

// Converts a C API status into ferry::Error carrying ferry_last_error()'s text and `what`.
void check(ferry_status_t status, const char* what);

}  // namespace ferry::tools
