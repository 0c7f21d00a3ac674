// Where this process sits in a job, read from whichever launcher started it: torchrun (RANK,
// WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), Open MPI's mpirun
// (OMPI_COMM_WORLD_*), a PMI/PMIx launch (PMI_RANK/PMI_SIZE, PMIX_RANK), or Slurm's srun
// (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_TASKS_PER_NODE, SLURM_STEP_NODELIST). The one
// reader bootstrap_from_env and the tools share.
#pragma once
#include <map>
#include <string>

namespace ferry::te {

enum class Launcher {
  none,      // a plain process: rank 0 of 1
  mpi,       // mpirun (Open MPI) or an MPICH/PMI/PMIx launch
  slurm,     // srun without MPI variables
  torchrun,  // RANK / WORLD_SIZE (MASTER_ADDR / MASTER_PORT for the rendezvous)
};
const char* launcher_name(Launcher launcher);

struct LaunchEnv {
  Launcher launcher = Launcher::none;
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;   // -1: unknown (the bootstrap derives it from host names)
  int local_size = -1;  // -1: unknown
  std::string master_addr;  // TCP rendezvous; empty when there is none
  int master_port = 0;
  // The variables the values came from, e.g. "OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK", for messages.
  std::string source;
  // The launcher's name for this job, e.g. "SLURM_JOB_ID=4242 SLURM_STEP_ID=0", identical on every
  // rank the launcher started; empty when the launcher names none. Part of the derived job key.
  std::string job_id;

  // An MPI runtime started this process, so MPI_Init can work.
  bool under_mpi() const { return launcher == Launcher::mpi; }
  bool has_master() const { return !master_addr.empty() && master_port > 0; }
};

using EnvVars = std::map<std::string, std::string>;

// Every variable of the process environment.
EnvVars process_environment();

// Precedence: Open MPI, PMIx, PMI, Slurm (when RANK is not set: torchrun under srun sets its own),
// torchrun. MASTER_ADDR / MASTER_PORT are read whatever the launcher. The port of the TCP rendezvous
// is FERRY_BOOTSTRAP_PORT when set, else MASTER_PORT, except under torchrun (TORCHELASTIC_RUN_ID set),
// whose store holds MASTER_PORT: there it is MASTER_PORT + 1. Under srun without them the
// rendezvous is the first node of the step and a port derived from the job and step ids. Empty
// values count as unset. Throws ferry::Error(Status::invalid_argument) naming the variable and its
// value when a value is malformed or inconsistent (rank outside [0, world size), a port outside
// [1, 65535], a world size above 2^24).
LaunchEnv read_launch_env(const EnvVars& vars);
LaunchEnv read_launch_env();

// The first host of a Slurm node list ("node[03-05],gpu1" -> "node03").
std::string first_slurm_host(const std::string& nodelist);

// What the TCP bootstrap's job key is made of. FERRY_JOB_KEY when set (a secret the launcher
// distributes: the only key that keeps out someone who can reach the port on purpose); else derived
// from what every rank of the job shares: the rendezvous port and the launcher's job id. A derived
// key keeps out what connects by accident (another job's ranks, a stale rank of an earlier job on
// the same port, port scanners, health checks), not someone who can read or guess those values.
struct JobKeySource {
  std::string material;     // hashed into the key; never sent anywhere
  std::string description;  // for messages: "FERRY_JOB_KEY" or "derived from MASTER_PORT=..."
  bool explicit_key = false;
};
JobKeySource job_key_source(const EnvVars& vars, int master_port);
JobKeySource job_key_source(int master_port);

}  // namespace ferry::te
