#include "transfer_engine/launch_env.h"

#include <charconv>
#include <optional>
#include <vector>

#include "transfer_engine/error.h"

extern "C" char** environ;

namespace ferry::te {

const char* launcher_name(Launcher launcher) {
  switch (launcher) {
    case Launcher::none: return "none";
    case Launcher::mpi: return "mpi";
    case Launcher::slurm: return "slurm";
    case Launcher::torchrun: return "torchrun";
  }
  return "unknown";
}

EnvVars process_environment() {
  EnvVars vars;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv(*e);
    const auto eq = kv.find('=');
    if (eq == std::string::npos) continue;
    vars.emplace(kv.substr(0, eq), kv.substr(eq + 1));
  }
  return vars;
}

namespace {

constexpr int kMaxWorldSize = 1 << 24;

class VarReader {
 public:
  explicit VarReader(const EnvVars& vars) : vars_(vars) {}
  // Launchers and users clear a variable by setting it empty: that is "unset" here.
  bool has(const char* name) const {
    auto it = vars_.find(name);
    return it != vars_.end() && !it->second.empty();
  }
  std::string get(const char* name) const {
    auto it = vars_.find(name);
    return it == vars_.end() ? std::string() : it->second;
  }
  std::optional<int> get_int(const char* name) const {
    if (!has(name)) return std::nullopt;
    const std::string text = get(name);
    int value = 0;
    const char* end = text.data() + text.size();
    auto [ptr, ec] = std::from_chars(text.data(), end, value);
    if (ec != std::errc() || ptr != end) {
      raise(Status::invalid_argument,
            std::string("environment variable ") + name + "='" + text + "' is not an integer");
    }
    return value;
  }
  // "NAME='value'" for messages about a value that parsed but does not fit.
  std::string quoted(const char* name) const { return std::string(name) + "='" + get(name) + "'"; }

 private:
  const EnvVars& vars_;
};

// Which launcher assigned this process its rank, from the presence of its variables alone.
Launcher detect_launcher(const VarReader& env) {
  if (env.has("OMPI_COMM_WORLD_RANK") || env.has("PMIX_RANK") || env.has("PMI_RANK")) {
    return Launcher::mpi;
  }
  if (env.has("SLURM_PROCID") && env.has("SLURM_NTASKS") && !env.has("RANK")) {
    return Launcher::slurm;
  }
  if (env.has("RANK") || env.has("WORLD_SIZE")) return Launcher::torchrun;
  return Launcher::none;
}

// The job id of the launcher that started the ranks: every rank it started sees the same values,
// whatever else differs between their environments (a torchrun started by ssh on some nodes of a
// Slurm allocation sees SLURM_JOB_ID on some ranks only, so Slurm's id is not used then).
std::string launcher_job_id(const VarReader& env, Launcher launcher) {
  std::vector<const char*> names;
  switch (launcher) {
    case Launcher::mpi:
      if (env.has("OMPI_COMM_WORLD_RANK")) names = {"OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE"};
      else if (env.has("PMIX_RANK")) names = {"PMIX_NAMESPACE"};
      else names = {"SLURM_JOB_ID", "SLURM_STEP_ID"};  // PMI through srun; hydra names no job
      break;
    case Launcher::slurm: names = {"SLURM_JOB_ID", "SLURM_STEP_ID"}; break;
    case Launcher::torchrun: names = {"TORCHELASTIC_RUN_ID"}; break;
    case Launcher::none: break;
  }
  std::string id;
  for (const char* name : names) {
    if (!env.has(name)) continue;
    if (!id.empty()) id += ' ';
    id += std::string(name) + "=" + env.get(name);
  }
  return id;
}

// Slurm writes tasks per node as "4(x2),3": the count of the first node is enough for a
// homogeneous job; anything else leaves local_size unknown for the bootstrap to derive.
int slurm_first_tasks_per_node(const std::string& spec) {
  const std::string first = spec.substr(0, spec.find_first_of("(,"));
  int value = 0;
  auto [ptr, ec] = std::from_chars(first.data(), first.data() + first.size(), value);
  return ec == std::errc() && ptr == first.data() + first.size() ? value : -1;
}

}  // namespace

std::string first_slurm_host(const std::string& nodelist) {
  // "node[03-05,9],gpu7" -> "node03"; "a1,b2" -> "a1"; "host" -> "host".
  const auto bracket = nodelist.find('[');
  const auto comma = nodelist.find(',');
  if (bracket == std::string::npos || (comma != std::string::npos && comma < bracket)) {
    return nodelist.substr(0, comma);
  }
  const auto end = nodelist.find_first_of("-,]", bracket + 1);
  if (end == std::string::npos) return {};
  return nodelist.substr(0, bracket) + nodelist.substr(bracket + 1, end - bracket - 1);
}

LaunchEnv read_launch_env(const EnvVars& vars) {
  VarReader env(vars);
  LaunchEnv out;
  out.launcher = detect_launcher(env);
  std::optional<int> rank, world, local_rank, local_size;
  const char* rank_var = "";
  const char* world_var = "";
  switch (out.launcher) {
    case Launcher::mpi:
      if (env.has("OMPI_COMM_WORLD_RANK")) {
        out.source = "OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK";
        rank_var = "OMPI_COMM_WORLD_RANK";
        world_var = "OMPI_COMM_WORLD_SIZE";
        local_rank = env.get_int("OMPI_COMM_WORLD_LOCAL_RANK");
        local_size = env.get_int("OMPI_COMM_WORLD_LOCAL_SIZE");
      } else {
        const bool pmix = env.has("PMIX_RANK");
        out.source = pmix ? "PMIX_RANK" : "PMI_RANK/PMI_SIZE";
        rank_var = pmix ? "PMIX_RANK" : "PMI_RANK";
        // PMIx publishes no size variable; srun and MPICH's hydra do.
        for (const char* name : {"PMI_SIZE", "SLURM_NTASKS", "WORLD_SIZE"}) {
          if (env.has(name)) {
            world_var = name;
            break;
          }
        }
        if (!*world_var && !pmix) {
          raise(Status::invalid_argument, "PMI_RANK is set but PMI_SIZE is not");
        }
        local_rank = env.get_int("MPI_LOCALRANKID");
        if (!local_rank) local_rank = env.get_int("SLURM_LOCALID");
        local_size = env.get_int("MPI_LOCALNRANKS");
      }
      break;
    case Launcher::slurm:
      out.source = "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID";
      rank_var = "SLURM_PROCID";
      world_var = "SLURM_NTASKS";
      local_rank = env.get_int("SLURM_LOCALID");
      if (env.has("SLURM_TASKS_PER_NODE")) {
        const int n = slurm_first_tasks_per_node(env.get("SLURM_TASKS_PER_NODE"));
        if (n > 0) local_size = n;
      }
      break;
    case Launcher::torchrun:
      out.source = "RANK/WORLD_SIZE/LOCAL_RANK";
      rank_var = "RANK";
      world_var = "WORLD_SIZE";
      if (!env.has("RANK")) raise(Status::invalid_argument, "WORLD_SIZE is set but RANK is not");
      if (!env.has("WORLD_SIZE")) raise(Status::invalid_argument, "RANK is set but WORLD_SIZE is not");
      local_rank = env.get_int("LOCAL_RANK");
      local_size = env.get_int("LOCAL_WORLD_SIZE");
      break;
    case Launcher::none: break;
  }
  if (*rank_var) rank = env.get_int(rank_var);
  if (*world_var) world = env.get_int(world_var);

  out.master_addr = env.get("MASTER_ADDR");
  if (auto port = env.get_int("MASTER_PORT")) {
    if (*port <= 0 || *port > 65535) {
      raise(Status::invalid_argument, env.quoted("MASTER_PORT") + " is not a TCP port (1..65535)");
    }
    out.master_port = *port;
  }
  if (auto port = env.get_int("FERRY_BOOTSTRAP_PORT")) {
    if (*port <= 0 || *port > 65535) {
      raise(Status::invalid_argument, env.quoted("FERRY_BOOTSTRAP_PORT") + " is not a TCP port (1..65535)");
    }
    out.master_port = *port;
    out.source += " (rendezvous port: FERRY_BOOTSTRAP_PORT)";
  } else if (out.launcher == Launcher::torchrun && env.has("TORCHELASTIC_RUN_ID") && out.master_port > 0) {
    // torchrun's store already listens on MASTER_PORT (the agent's, or the one init_process_group
    // makes on rank 0): the bootstrap takes the next port, the same on every rank.
    if (out.master_port == 65535) {
      raise(Status::invalid_argument, "MASTER_PORT=65535 leaves no next port for Ferry's rendezvous under torchrun; "
                                      "set FERRY_BOOTSTRAP_PORT");
    }
    ++out.master_port;
    out.source += " (rendezvous port: MASTER_PORT + 1, torchrun's store holds MASTER_PORT)";
  }
  out.job_id = launcher_job_id(env, out.launcher);
  if (out.launcher == Launcher::none) return out;
  // srun without MPI and without a rendezvous: rank 0 runs on the first node of the step, and every
  // rank computes the same port from the job and step ids.
  if (out.launcher == Launcher::slurm && out.master_addr.empty()) {
    const std::string nodes = env.has("SLURM_STEP_NODELIST") ? env.get("SLURM_STEP_NODELIST")
                                                             : env.get("SLURM_JOB_NODELIST");
    const auto job = env.get_int("SLURM_JOB_ID");
    if (!nodes.empty() && job) {
      out.master_addr = first_slurm_host(nodes);
      const long long step = env.get_int("SLURM_STEP_ID").value_or(0);
      out.master_port = static_cast<int>(20000 + ((static_cast<long long>(*job) * 31 + step) % 20000 + 20000) % 20000);
      out.source += " (rendezvous: first node of SLURM_STEP_NODELIST, port from SLURM_JOB_ID)";
    }
  }

  out.rank = rank.value_or(0);
  out.world_size = world.value_or(1);
  if (out.world_size < 1 || out.world_size > kMaxWorldSize) {
    raise(Status::invalid_argument, env.quoted(world_var) + " is not a world size in [1, " +
                                        std::to_string(kMaxWorldSize) + "]");
  }
  if (out.rank < 0 || out.rank >= out.world_size) {
    raise(Status::invalid_argument,
          (*rank_var ? env.quoted(rank_var) : "rank " + std::to_string(out.rank)) +
              " is outside [0, " + std::to_string(out.world_size) + ")" +
              (*world_var ? " given by " + env.quoted(world_var) : std::string()));
  }
  out.local_rank = local_rank.value_or(out.world_size == 1 ? 0 : -1);
  out.local_size = local_size.value_or(-1);
  if (out.local_size != -1 && (out.local_size < 1 || out.local_size > out.world_size)) {
    raise(Status::invalid_argument, "local size " + std::to_string(out.local_size) + " from " +
                                        out.source + " is outside [1, " +
                                        std::to_string(out.world_size) + "]");
  }
  if (out.local_rank < -1 || out.local_rank >= out.world_size ||
      (out.local_size > 0 && out.local_rank >= out.local_size)) {
    raise(Status::invalid_argument,
          "local rank " + std::to_string(out.local_rank) + " from " + out.source + " is outside [0, " +
              std::to_string(out.local_size > 0 ? out.local_size : out.world_size) + ")");
  }
  return out;
}

LaunchEnv read_launch_env() { return read_launch_env(process_environment()); }

JobKeySource job_key_source(const EnvVars& vars, int master_port) {
  VarReader env(vars);
  JobKeySource key;
  if (env.has("FERRY_JOB_KEY")) {
    key.material = "explicit\n" + env.get("FERRY_JOB_KEY");
    key.description = "FERRY_JOB_KEY";
    key.explicit_key = true;
    return key;
  }
  // Not MASTER_ADDR: ranks may name the same host differently ("localhost", "127.0.0.1", an alias),
  // and a connection to the port already proves the client knew the address. Not WORLD_SIZE: it is
  // carried in the authenticated hello, where a mismatch gets its own error on every rank.
  const std::string job = launcher_job_id(env, detect_launcher(env));
  key.material = "derived\nport=" + std::to_string(master_port) + "\n" + job;
  key.description = "derived from MASTER_PORT=" + std::to_string(master_port) +
                    (job.empty() ? std::string(" (the launcher names no job id)") : " and " + job);
  return key;
}

JobKeySource job_key_source(int master_port) {
  return job_key_source(process_environment(), master_port);
}

}  // namespace ferry::te
