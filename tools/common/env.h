// Where this process sits in a job: rank, world size and local rank, read from whichever launcher
// started it (mpirun/srun through MPI/PMI/PMIx/Slurm variables, or torchrun-style variables), plus a
// description of the machine for reports.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "transfer_engine/launch_env.h"

namespace ferry::tools {

// The launcher reader is transfer_engine's (launch_env.h), shared with ferry_bootstrap_from_env so
// the tools and the library always agree on who is which rank.
using Launcher = te::Launcher;
using RankEnv = te::LaunchEnv;
using te::first_slurm_host;
using te::launcher_name;

// te::read_launch_env of the process environment, or of an explicit variable map (testable without
// touching the process environment).
RankEnv discover_rank_env();
RankEnv discover_rank_env(const std::map<std::string, std::string>& vars);

// A snapshot of every variable in the process environment.
std::map<std::string, std::string> environment_map();

// What a benchmark report says about where it ran.
struct HostInfo {
  std::string hostname;
  std::string date_utc;          // ISO 8601
  std::string ferry_version;
  std::string libfabric_version; // runtime fi_version()
  std::string hwloc_version;
  std::string cpu_model;
  int num_cpus = 0;
  std::vector<std::string> nics;  // "provider:domain" pairs that libfabric lists for the provider
  std::vector<std::string> gpus;  // "name (sm_XY, N GiB)"; empty without CUDA or a GPU
  std::string cuda_driver_version;
};
// `provider`: the libfabric provider to list NICs for ("tcp", "efa", ...; empty: all).
HostInfo collect_host_info(const std::string& provider);

// Parses a whole decimal int; nullopt when empty, malformed or out of range.
std::optional<int> parse_int(const std::string& text);

}  // namespace ferry::tools
