// A tiny program launched by test_launch: with --local-ranks it starts itself as a job through
// ferry_tools_common; as a rank it reports what it discovered (its FERRY_NODE_ID included, after
// --local-nodes) and then behaves as told.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "tools/common/env.h"
#include "tools/common/launch.h"
#include "transfer_engine/error.h"

int main(int argc, char** argv) {
  int local_ranks = 0, local_nodes = 0, fail_rank = -1, fail_code = 3, hang_rank = -1, timeout_ms = 60000;
  std::string launcher = "fork";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (a == "--local-ranks") local_ranks = v;
    else if (a == "--local-nodes") local_nodes = v;
    else if (a == "--launcher") launcher = argv[i + 1];
    else if (a == "--fail-rank") fail_rank = v;
    else if (a == "--fail-code") fail_code = v;
    else if (a == "--hang-rank") hang_rank = v;
    else if (a == "--timeout-ms") timeout_ms = v;
  }
  if (local_ranks > 0 && !ferry::tools::is_local_launch_child()) {
    ferry::tools::LocalLaunchOptions opt;
    opt.num_ranks = local_ranks;
    opt.launcher = launcher == "mpi" ? ferry::tools::LocalLauncher::mpi : ferry::tools::LocalLauncher::fork;
    opt.args = ferry::tools::args_without_launch_options(argc, argv);
    opt.timeout_ms = timeout_ms;
    opt.kill_grace_ms = 500;
    opt.local_nodes = local_nodes;
    try {
      return ferry::tools::run_local_ranks(opt);
    } catch (const ferry::Error& e) {
      std::fprintf(stderr, "launch_probe: %s\n", e.what());
      return 2;
    }
  }
  const auto env = ferry::tools::discover_rank_env();
  try {
    const auto nodes = ferry::tools::apply_local_nodes(env.rank, env.world_size);
    if (nodes.local_nodes > 0 || !nodes.node_id.empty()) {
      std::printf("rank %d of %d node %s of %d\n", env.rank, env.world_size, nodes.node_id.c_str(),
                  nodes.local_nodes);
    }
  } catch (const ferry::Error& e) {
    std::fprintf(stderr, "launch_probe: rank %d: %s\n", env.rank, e.what());
    return 2;
  }
  std::printf("rank %d of %d local %d launcher %s master %s:%d\n", env.rank, env.world_size,
              env.local_rank, ferry::tools::launcher_name(env.launcher), env.master_addr.c_str(),
              env.master_port);
  std::fflush(stdout);
  std::fprintf(stderr, "stderr line from rank %d\n", env.rank);
  if (env.rank == fail_rank) return fail_code;
  if (env.rank == hang_rank) {
    for (;;) ::pause();
  }
  // Ranks that do not fail wait a little, so a failing rank's siblings are still running and the
  // launcher has to stop them.
  if (fail_rank >= 0) ::sleep(30);
  return 0;
}
