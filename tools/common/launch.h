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
  // > 0: the ranks play this many nodes (`--local-nodes`); every child gets FERRY_LOCAL_NODES and
  // sets its own FERRY_NODE_ID from its rank (apply_local_nodes), which works the same under fork and
  // mpirun because only the child knows its rank under mpirun.
  int local_nodes = 0;
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

// `--local-nodes N`: one machine plays N nodes, for the CUDA backend's choice between CUDA IPC (same
// node) and the transfer engine (other nodes), which compares FERRY_NODE_ID when it is set.
constexpr const char* kLocalNodesVar = "FERRY_LOCAL_NODES";
constexpr const char* kNodeIdVar = "FERRY_NODE_ID";

// Empty when `local_nodes` nodes can share `num_ranks` ranks (at least 1, and dividing them); else a
// message naming both options.
std::string check_local_nodes(int local_nodes, int num_ranks);

// The FERRY_NODE_ID of `rank` when `world_size` ranks play `local_nodes` nodes: contiguous groups of
// world_size / local_nodes ranks, "local-node-<rank * local_nodes / world_size>".
std::string emulated_node_id(int rank, int world_size, int local_nodes);

// Which node a rank belongs to, as the report shows it.
struct NodeEmulation {
  int local_nodes = 0;      // FERRY_LOCAL_NODES; 0 when unset
  std::string node_id;      // this rank's FERRY_NODE_ID after apply_local_nodes; "" when unset
  bool user_node_id = false;  // FERRY_NODE_ID was set before, so it was kept (it wins over the split)
};

// In a rank, before anything reads FERRY_NODE_ID (the all-to-all's creation): when FERRY_LOCAL_NODES
// is set, sets FERRY_NODE_ID=emulated_node_id(rank, world_size, N) unless FERRY_NODE_ID is already
// set. Throws ferry::Error(Status::invalid_argument) naming the variable when its value is not an
// integer or does not divide the world size.
NodeEmulation apply_local_nodes(int rank, int world_size);

// The node a rank reports: FERRY_NODE_ID when set and not empty, else the host name.
std::string node_label();

// "local-node-0: ranks 0-3; local-node-1: ranks 4-7" from each rank's node, in rank order (runs of
// consecutive ranks; a node whose ranks are not contiguous is named once per run).
std::string describe_rank_nodes(const std::vector<std::string>& rank_nodes);

// Strips "--local-ranks N", "--local-nodes N" and "--launcher X" (and their "--opt=value" forms) from
// argv, for children that must not launch again (mpirun children keep the marker variable too; the
// node count travels as FERRY_LOCAL_NODES).
std::vector<std::string> args_without_launch_options(int argc, const char* const* argv);

}  // namespace ferry::tools
