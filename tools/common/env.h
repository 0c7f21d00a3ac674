// Where this process sits in a job: rank, world size and local rank, read from whichever launcher
// started it (mpirun/srun through MPI/PMI/PMIx/Slurm variables, or torchrun-style variables), plus a
// description of the machine for reports.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ferry::tools {

enum class Launcher {
  none,      // a plain process: rank 0 of 1
  mpi,       // mpirun (Open MPI) or an MPICH/PMI launch
  slurm,     // srun without MPI variables
  torchrun,  // RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
};
const char* launcher_name(Launcher l);

struct RankEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_size = -1;  // -1: unknown (the bootstrap derives it from host names)
  Launcher launcher = Launcher::none;
  std::string master_addr;  // torchrun-style rendezvous, empty when absent
  int master_port = 0;
  // The environment variables the values came from, e.g. "OMPI_COMM_WORLD_RANK", for messages.
  std::string source;

  // True when an MPI runtime started this process, so MPI_Init can work and an MPI baseline is
  // meaningful.
  bool under_mpi() const { return launcher == Launcher::mpi; }
  bool has_master() const { return !master_addr.empty() && master_port > 0; }
};

// Reads the environment. Precedence: Open MPI (OMPI_COMM_WORLD_*), PMIx (PMIX_RANK), PMI (PMI_RANK /
// PMI_SIZE), Slurm (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID), torchrun (RANK / WORLD_SIZE /
// LOCAL_RANK); MASTER_ADDR / MASTER_PORT are read whatever the launcher (under srun without them, the
// first node of the step and a port derived from the job id). Throws
// ferry::Error(Status::invalid_argument) naming the variable when a value is malformed or
// inconsistent (rank outside [0, world_size)).
RankEnv discover_rank_env();
// Same, from an explicit variable map (testable without touching the process environment).
RankEnv discover_rank_env(const std::map<std::string, std::string>& vars);

// The first host of a Slurm node list ("node[03-05],gpu1" -> "node03").
std::string first_slurm_host(const std::string& nodelist);

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
