// `--local-ranks N`: one command starts a whole job on this machine. The parent re-executes its own
// binary N times with torchrun-style variables (or once under `mpirun -np N`), forwards the ranks'
// output, and fails the job as soon as one rank fails or the deadline passes.
#pragma once
#include <string>
#include <vector>

namespace ferry::tools {

enum class LocalLauncher {
  fork,  // N children with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR=127.0.0.1 / MASTER_PORT
  mpi,   // one `mpirun --allow-run-as-root --oversubscribe --bind-to none -np N` child
};

struct LocalLaunchOptions {
  int num_ranks = 1;
  LocalLauncher launcher = LocalLauncher::fork;
  // The arguments the children get (argv[1..]); the parent usually passes its own.
  std::vector<std::string> args;
  // Kill everything and fail when the job runs longer than this.
  int timeout_ms = 300000;
  // Extra environment for every child ("NAME=value").
  std::vector<std::string> extra_env;
  // After one rank fails, the others get SIGTERM, then SIGKILL after this grace period.
  int kill_grace_ms = 2000;
  std::string mpirun = "mpirun";  // path or name looked up in PATH
};

// Set in every child the launcher starts, so a tool that sees it does not launch again.
constexpr const char* kChildMarkerVar = "FERRY_LOCAL_RANKS_CHILD";
bool is_local_launch_child();

// Whether `mpirun` (or the given name) is an executable in PATH.
bool mpirun_available(const std::string& mpirun = "mpirun");

// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back, close).
int find_free_port();

// The absolute path of the running executable (/proc/self/exe).
std::string self_executable();

// Runs the job and returns the process exit code for the parent: 0 when every rank exited 0;
// otherwise the first failed rank's exit code (1 when it died of a signal or timed out). Writes to
// stderr which ranks failed, how, and which were killed. Rank 0's stdout and stderr pass through
// as is (progress lines keep their carriage returns); the other ranks' lines are prefixed
// "[rank N] ".
int run_local_ranks(const LocalLaunchOptions& options);

// Strips "--local-ranks N" / "--local-ranks=N" and "--launcher X" / "--launcher=X" from argv, for
// children that must not launch again (mpirun children keep the marker variable too).
std::vector<std::string> args_without_launch_options(int argc, const char* const* argv);

}  // namespace ferry::tools
