// ferry-moe-layer: one MoE layer forward, plain and two-micro-batch, with the hidden fraction of
// Ferry's transfers. See --help and bench/moe_layer/README.md.
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "bench/moe_layer/options.h"
#include "bench/moe_layer/runner.h"
#include "tools/common/env.h"
#include "tools/common/launch.h"
#include "transfer_engine/error.h"

int main(int argc, char** argv) {
  using namespace ferry;
  const auto parsed = moe::parse_options(argc, argv);
  if (!parsed.options) return parsed.exit_code;
  const moe::Options& o = *parsed.options;
  int rank = -1;
  try {
    if (o.local_ranks > 0 && !tools::is_local_launch_child()) {
      tools::LocalLaunchOptions launch;
      launch.num_ranks = o.local_ranks;
      const std::string launcher = o.launcher.empty() ? "fork" : o.launcher;
      if (launcher == "mpi" && !tools::mpirun_available()) {
        std::fprintf(stderr, "ferry-moe-layer: error: --launcher mpi: mpirun is not in PATH\n");
        return 2;
      }
      launch.launcher = launcher == "mpi" ? tools::LocalLauncher::mpi : tools::LocalLauncher::fork;
      launch.args = tools::args_without_launch_options(argc, argv);
      launch.extra_env.push_back("FERRY_MOE_LAUNCHER=local-" + launcher);
      if (launch.launcher == tools::LocalLauncher::mpi) {
        launch.extra_env.push_back("MASTER_ADDR=127.0.0.1");
        launch.extra_env.push_back("MASTER_PORT=" + std::to_string(tools::find_free_port()));
      }
      // Every wait has --timeout-ms; each iteration runs each schedule three times.
      launch.timeout_ms = o.launch_timeout_ms > 0 ? o.launch_timeout_ms
                                                  : 2 * o.timeout_ms + 120000 + 500 * (o.warmup + o.iters) * o.local_ranks;
      return tools::run_local_ranks(launch);
    }
    const auto env = tools::discover_rank_env();
    rank = env.rank;
    const char* label = std::getenv("FERRY_MOE_LAUNCHER");
    return moe::run_rank(o, label ? label : tools::launcher_name(env.launcher));
  } catch (const Error& e) {
    std::fprintf(stderr, "ferry-moe-layer: rank %d: error (%s): %s\n", rank, status_name(e.status()), e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry-moe-layer: rank %d: error: %s\n", rank, e.what());
    return 1;
  }
}
