// ferry-bench: EP dispatch/combine latency. See --help, and bench/ep/README.md.
#include <cstdio>
#include <cstdlib>
#include <exception>

#include "bench/ep/dry_run.h"
#include "bench/ep/mpi_baseline.h"
#include "bench/ep/options.h"
#include "bench/ep/runner.h"
#include "tools/common/env.h"
#include "tools/common/launch.h"
#include "transfer_engine/error.h"

int main(int argc, char** argv) {
  using namespace ferry;
  const auto parsed = bench::parse_options(argc, argv);
  if (!parsed.options) return parsed.exit_code;
  const bench::Options& o = *parsed.options;
  if (o.dry_run) return bench::run_dry_run(o);

  int rank = -1;
  try {
    if (o.local_ranks > 0 && !tools::is_local_launch_child()) {
      tools::LocalLaunchOptions launch;
      launch.num_ranks = o.local_ranks;
#if defined(FERRY_HAVE_MPI)
      const bool mpi_default = tools::mpirun_available();
#else
      const bool mpi_default = false;
#endif
      const std::string launcher = o.launcher.empty() ? (mpi_default ? "mpi" : "fork") : o.launcher;
      if (launcher == "mpi" && !tools::mpirun_available()) {
        std::fprintf(stderr, "ferry-bench: error: --launcher mpi: mpirun is not in PATH\n");
        return 2;
      }
      launch.launcher = launcher == "mpi" ? tools::LocalLauncher::mpi : tools::LocalLauncher::fork;
      launch.local_nodes = o.local_nodes;
      if (const char* id = std::getenv(tools::kNodeIdVar); o.local_nodes > 0 && id && *id) {
        std::fprintf(stderr, "ferry-bench: FERRY_NODE_ID=%s is set: every rank keeps it, so the ranks "
                     "are one node, not the %d of --local-nodes\n", id, o.local_nodes);
      }
      launch.args = tools::args_without_launch_options(argc, argv);
      launch.extra_env.push_back(std::string("FERRY_BENCH_LAUNCHER=local-") + launcher);
      if (launch.launcher == tools::LocalLauncher::mpi) {
        // Ferry's own rendezvous goes over TCP; MPI is only the baseline.
        launch.extra_env.push_back("MASTER_ADDR=127.0.0.1");
        launch.extra_env.push_back("MASTER_PORT=" + std::to_string(tools::find_free_port()));
        for (const std::string& e : bench::matching_mpi_env(bench::resolved_provider(o))) launch.extra_env.push_back(e);
      }
      // Generous but finite: every wait has --timeout-ms, and the iterations of both ferry and the
      // baseline must fit with a loaded machine.
      launch.timeout_ms = o.launch_timeout_ms > 0
                              ? o.launch_timeout_ms
                              : 2 * o.timeout_ms + 60000 + 200 * (o.warmup + o.iters) * o.local_ranks;
      return tools::run_local_ranks(launch);
    }
    const auto env = tools::discover_rank_env();
    rank = env.rank;
    // Before the all-to-all exists: its CUDA backend reads FERRY_NODE_ID when it is created.
    const tools::NodeEmulation nodes = tools::apply_local_nodes(env.rank, env.world_size);
    const char* label = std::getenv("FERRY_BENCH_LAUNCHER");
    return bench::run_rank(o, label ? label : tools::launcher_name(env.launcher), nodes);
  } catch (const Error& e) {
    std::fprintf(stderr, "ferry-bench: rank %d: error (%s): %s\n", rank, status_name(e.status()), e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ferry-bench: rank %d: error: %s\n", rank, e.what());
    return 1;
  }
}
