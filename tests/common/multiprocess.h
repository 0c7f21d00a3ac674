// One fixture that launches N real processes, each with a bootstrap, for every multi-rank test.
//
//   auto results = ferry::testing::run_ranks({.world_size = 4}, [](ferry::te::Bootstrap& b) {
//     ... this runs in each child, as rank b.rank() ...
//   });
//   ferry::testing::expect_all_ok(results);
//
// gtest assertions inside the body work: a failed EXPECT/ASSERT makes that rank exit 1 and its
// output (captured) is printed by expect_all_ok.
//
// Network namespaces: with rank_netns set, each child enters its namespace before anything else.
// The bootstrap root (rank 0) must then be reachable from every namespace: pass the address of
// rank 0's interface explicitly as env["MASTER_ADDR"] (e.g. NetnsCluster::address(0, 0)); the
// default 127.0.0.1 only works when all ranks share one namespace. Ranks that enter the same
// namespace are one "host" for LOCAL_RANK / LOCAL_WORLD_SIZE.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "transfer_engine/bootstrap.h"

namespace ferry::testing {

struct LaunchOptions {
  int world_size = 2;
  int timeout_ms = 60000;                  // whole run; children killed after it
  std::map<std::string, std::string> env;  // set in every child (e.g. FI_PROVIDER, FI_TCP_TX_SIZE)
  std::function<std::map<std::string, std::string>(int rank)> rank_env;  // optional per-rank env
  std::function<std::string(int rank)>
      rank_netns;  // optional: netns each rank enters (setns) first
  // Deadline for building the bootstrap in each child; 0: half of timeout_ms, so a rank that does
  // not arrive is reported by the bootstrap (naming it) before the whole run is killed.
  int bootstrap_timeout_ms = 0;
  // With rank_netns: each child also gets its own UTS namespace whose host name is its network
  // namespace's name, so host-name based locality (and anything that prints host names) sees
  // distinct hosts, as on a real cluster.
  bool netns_hostname = false;
  // Optional: runs in each child after entering its namespace and before the bootstrap is built,
  // e.g. to delay one rank or to make it leave (_exit) without ever joining.
  std::function<void(int rank)> before_bootstrap;
};

struct RankResult {
  int rank = 0;
  int exit_code = -1;  // exit status, or the signal number when signaled
  bool signaled = false;
  bool timed_out = false;
  std::string output;  // captured stderr + stdout of the child
};

// Forks world_size children (call it before any libfabric use in the parent). Each child gets
// MASTER_ADDR (127.0.0.1 unless env sets it), MASTER_PORT (a free port chosen by the parent unless
// env sets it), RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, then options.env and
// options.rank_env(rank) on top; enters its namespace, builds te::bootstrap_from_env and runs body.
// An exception prints "rank N: <what>" and exits 1; a failed gtest assertion exits 1; a normal
// return exits 0. Children leave through _exit, never through the parent's atexit handlers or gtest
// teardown. The parent waits until timeout_ms, kills every child left, and returns one result per
// rank, in rank order.
std::vector<RankResult> run_ranks(const LaunchOptions& options,
                                  const std::function<void(te::Bootstrap&)>& body);

// gtest: EXPECT every rank exited 0, printing each failed rank's output.
void expect_all_ok(const std::vector<RankResult>& results);

// A TCP port that was free on this host a moment ago, below the ephemeral range so that no
// outgoing connection takes it before the caller binds it.
int pick_free_port();

}  // namespace ferry::testing
