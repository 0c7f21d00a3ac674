#include "tools/common/launch.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <sstream>

#include "tools/common/env.h"
#include "transfer_engine/error.h"
#include "transfer_engine/fabric/shm_names.h"

namespace ferry::tools {

namespace {

using Clock = std::chrono::steady_clock;

// An owned file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(o.release()) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(o.release());
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  int release() { int f = fd_; fd_ = -1; return f; }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

struct Stream {
  Fd fd;
  int rank = 0;
  bool is_stderr = false;
  std::string partial;  // bytes of an unfinished line (prefixed streams only)
};

struct Child {
  pid_t pid = -1;
  int rank = 0;  // for mpi: the mpirun process stands for the whole job, labelled rank 0
  bool running = true;
  int exit_code = 0;
  int term_signal = 0;
  bool killed_by_us = false;
};

void write_all(int fd, const char* data, size_t bytes) {
  while (bytes > 0) {
    const ssize_t n = ::write(fd, data, bytes);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // our own stdout is gone; nothing useful left to do with the bytes
    }
    data += n;
    bytes -= static_cast<size_t>(n);
  }
}

void forward(Stream& s, const char* data, size_t bytes, bool passthrough) {
  const int out = s.is_stderr ? STDERR_FILENO : STDOUT_FILENO;
  if (passthrough) {
    write_all(out, data, bytes);
    return;
  }
  s.partial.append(data, bytes);
  size_t start = 0;
  for (size_t nl; (nl = s.partial.find('\n', start)) != std::string::npos; start = nl + 1) {
    const std::string line = "[rank " + std::to_string(s.rank) + "] " +
                             s.partial.substr(start, nl - start + 1);
    write_all(out, line.data(), line.size());
  }
  s.partial.erase(0, start);
}

void flush_partial(Stream& s) {
  if (s.partial.empty()) return;
  const std::string line = "[rank " + std::to_string(s.rank) + "] " + s.partial + "\n";
  write_all(s.is_stderr ? STDERR_FILENO : STDOUT_FILENO, line.data(), line.size());
  s.partial.clear();
}

// Set by SIGINT/SIGTERM in the launcher: the ranks get SIGTERM (they run in their own process
// groups, so a terminal's Ctrl-C reaches only the launcher).
volatile sig_atomic_t g_interrupted = 0;
extern "C" void on_interrupt(int sig) { g_interrupted = sig; }

// Installs on_interrupt for the life of the object and restores the previous handlers.
class InterruptGuard {
 public:
  InterruptGuard() {
    struct sigaction sa{};
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, &old_int_);
    ::sigaction(SIGTERM, &sa, &old_term_);
    g_interrupted = 0;
  }
  ~InterruptGuard() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }

 private:
  struct sigaction old_int_{}, old_term_{};
};

std::string join_ranks(const std::vector<int>& ranks) {
  std::ostringstream os;
  for (size_t i = 0; i < ranks.size(); ++i) os << (i ? "," : "") << ranks[i];
  return os.str();
}

}  // namespace

bool is_local_launch_child() { return std::getenv(kChildMarkerVar) != nullptr; }

bool mpirun_available(const std::string& mpirun) {
  if (mpirun.find('/') != std::string::npos) return ::access(mpirun.c_str(), X_OK) == 0;
  const char* path = std::getenv("PATH");
  if (!path) return false;
  std::stringstream ss(path);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) continue;
    const std::string candidate = dir + "/" + mpirun;
    struct stat st{};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode) &&
        ::access(candidate.c_str(), X_OK) == 0) {
      return true;
    }
  }
  return false;
}

int find_free_port() {
  Fd sock(::socket(AF_INET, SOCK_STREAM, 0));
  if (sock.get() < 0) raise(Status::internal, errno_text("socket() for a free port"));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::bind(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    raise(Status::internal, errno_text("bind(127.0.0.1:0) for a free port"));
  }
  socklen_t len = sizeof(addr);
  if (::getsockname(sock.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    raise(Status::internal, errno_text("getsockname() for a free port"));
  }
  return ntohs(addr.sin_port);
}

std::string self_executable() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) raise(Status::internal, errno_text("readlink(/proc/self/exe)"));
  return std::string(buf, static_cast<size_t>(n));
}

std::vector<std::string> args_without_launch_options(int argc, const char* const* argv) {
  static const char* kLaunchOptions[] = {"--local-ranks", "--local-nodes", "--launcher"};
  std::vector<std::string> out;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    bool launch_option = false, with_value = false;
    for (const char* name : kLaunchOptions) {
      launch_option = launch_option || a == name;
      with_value = with_value || a.rfind(std::string(name) + "=", 0) == 0;
    }
    if (launch_option) ++i;  // skip the value too
    if (launch_option || with_value) continue;
    out.push_back(a);
  }
  return out;
}

std::string check_local_nodes(int local_nodes, int num_ranks) {
  if (local_nodes < 1) return "--local-nodes must be at least 1, got " + std::to_string(local_nodes);
  if (num_ranks % local_nodes != 0) {
    return "--local-nodes " + std::to_string(local_nodes) + " does not divide --local-ranks " +
           std::to_string(num_ranks) + " (every emulated node needs the same number of ranks)";
  }
  return {};
}

std::string emulated_node_id(int rank, int world_size, int local_nodes) {
  const long long node = static_cast<long long>(rank) * local_nodes / world_size;
  return "local-node-" + std::to_string(node);
}

NodeEmulation apply_local_nodes(int rank, int world_size) {
  NodeEmulation out;
  const char* user = std::getenv(kNodeIdVar);
  out.user_node_id = user && *user;
  if (const char* n = std::getenv(kLocalNodesVar); n && *n) {
    const auto parsed = parse_int(n);
    if (!parsed) {
      raise(Status::invalid_argument, std::string(kLocalNodesVar) + "='" + n + "' is not an integer");
    }
    // The launcher checked against --local-ranks; a job started otherwise (mpirun -x) is checked here.
    if (*parsed < 1 || world_size % *parsed != 0) {
      raise(Status::invalid_argument, std::string(kLocalNodesVar) + "=" + n +
                                          " does not divide the world size " + std::to_string(world_size) +
                                          " (every emulated node needs the same number of ranks)");
    }
    out.local_nodes = *parsed;
    if (!out.user_node_id) {
      const std::string id = emulated_node_id(rank, world_size, *parsed);
      if (::setenv(kNodeIdVar, id.c_str(), 1) != 0) raise(Status::internal, errno_text("setenv(FERRY_NODE_ID)"));
    }
  }
  if (const char* id = std::getenv(kNodeIdVar); id && *id) out.node_id = id;
  return out;
}

std::string node_label() {
  if (const char* id = std::getenv(kNodeIdVar); id && *id) return id;
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  return host;
}

std::string describe_rank_nodes(const std::vector<std::string>& rank_nodes) {
  std::string out;
  for (size_t first = 0; first < rank_nodes.size();) {
    size_t last = first;
    while (last + 1 < rank_nodes.size() && rank_nodes[last + 1] == rank_nodes[first]) ++last;
    out += (out.empty() ? "" : "; ") + rank_nodes[first] + ": rank" + (last > first ? "s " : " ") +
           std::to_string(first) + (last > first ? "-" + std::to_string(last) : "");
    first = last + 1;
  }
  return out;
}

int run_local_ranks(const LocalLaunchOptions& opt) {
  if (opt.num_ranks < 1) {
    raise(Status::invalid_argument, "--local-ranks must be at least 1, got " + std::to_string(opt.num_ranks));
  }
  const std::string exe = self_executable();
  const int port = find_free_port();

  // The argv and environment of each child, built before forking (no allocation after fork).
  struct Plan {
    int rank;
    std::vector<std::string> argv;
    std::vector<std::string> env;
  };
  std::vector<Plan> plans;
  std::vector<std::string> extra_env = opt.extra_env;
  if (opt.local_nodes != 0) {
    if (auto msg = check_local_nodes(opt.local_nodes, opt.num_ranks); !msg.empty()) {
      raise(Status::invalid_argument, msg);
    }
    extra_env.push_back(std::string(kLocalNodesVar) + "=" + std::to_string(opt.local_nodes));
  }
  std::vector<std::string> base_env;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv(*e);
    // A launch from inside an mpirun/srun/torchrun job must not leak the outer job's identity.
    static const char* kDrop[] = {"OMPI_COMM_WORLD_", "PMIX_", "PMI_", "SLURM_PROCID=", "SLURM_LOCALID=",
                                  "SLURM_NTASKS=", "RANK=", "WORLD_SIZE=", "LOCAL_RANK=",
                                  "LOCAL_WORLD_SIZE=", "MASTER_ADDR=", "MASTER_PORT="};
    bool drop = false;
    for (const char* p : kDrop) drop = drop || kv.rfind(p, 0) == 0;
    // A variable the launcher sets itself appears once, with the launcher's value (getenv would
    // return whichever copy comes first).
    for (const auto& x : extra_env) drop = drop || kv.rfind(x.substr(0, x.find('=') + 1), 0) == 0;
    if (!drop) base_env.push_back(kv);
  }
  base_env.push_back(std::string(kChildMarkerVar) + "=1");
  for (const auto& e : extra_env) base_env.push_back(e);

  if (opt.launcher == LocalLauncher::mpi) {
    Plan p{0, {opt.mpirun, "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
               "-x", kChildMarkerVar, "-np", std::to_string(opt.num_ranks), exe},
           base_env};
    for (const auto& e : extra_env) {
      p.argv.insert(p.argv.begin() + 5, {"-x", e.substr(0, e.find('='))});
    }
    p.argv.insert(p.argv.end(), opt.args.begin(), opt.args.end());
    plans.push_back(std::move(p));
  } else {
    for (int r = 0; r < opt.num_ranks; ++r) {
      Plan p{r, {exe}, base_env};
      p.argv.insert(p.argv.end(), opt.args.begin(), opt.args.end());
      const std::string n = std::to_string(opt.num_ranks);
      p.env.insert(p.env.end(), {"RANK=" + std::to_string(r), "WORLD_SIZE=" + n,
                                 "LOCAL_RANK=" + std::to_string(r), "LOCAL_WORLD_SIZE=" + n,
                                 "MASTER_ADDR=127.0.0.1", "MASTER_PORT=" + std::to_string(port)});
      plans.push_back(std::move(p));
    }
  }

  std::vector<Child> children;
  std::vector<Stream> streams;
  auto kill_all = [&](int sig) {
    for (auto& c : children) {
      if (c.running) {
        ::kill(-c.pid, sig);  // each child leads its own process group (mpirun's ranks included)
        c.killed_by_us = true;
      }
    }
  };

  for (auto& plan : plans) {
    int out_pipe[2], err_pipe[2];
    if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0) {
      kill_all(SIGKILL);
      raise(Status::internal, errno_text("pipe2() for rank output"));
    }
    std::vector<char*> argv, envp;
    for (auto& a : plan.argv) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& e : plan.env) envp.push_back(e.data());
    envp.push_back(nullptr);
    const char* file = plan.argv[0].c_str();
    const bool search_path = plan.argv[0].find('/') == std::string::npos;
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) {
      kill_all(SIGKILL);
      raise(Status::internal, errno_text("fork()"));
    }
    if (pid == 0) {
      ::setpgid(0, 0);
      // If the launcher dies, its ranks must not linger holding ports and memory.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) ::_exit(127);
      ::dup2(out_pipe[1], STDOUT_FILENO);
      ::dup2(err_pipe[1], STDERR_FILENO);
      if (search_path) {
        ::execvpe(file, argv.data(), envp.data());
      } else {
        ::execve(file, argv.data(), envp.data());
      }
      const char msg[] = "exec failed\n";
      (void)!::write(STDERR_FILENO, msg, sizeof(msg) - 1);
      ::_exit(127);
    }
    ::setpgid(pid, pid);  // also in the parent, so kill(-pid) works even before the child runs
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    children.push_back(Child{pid, plan.rank});
    streams.push_back(Stream{Fd(out_pipe[0]), plan.rank, false, {}});
    streams.push_back(Stream{Fd(err_pipe[0]), plan.rank, true, {}});
  }

  InterruptGuard interrupt_guard;
  bool interrupted = false;
  const auto deadline = Clock::now() + std::chrono::milliseconds(opt.timeout_ms);
  std::optional<Clock::time_point> kill_at;  // SIGKILL time after a SIGTERM round
  bool timed_out = false;
  int first_failed = -1;
  std::vector<int> failed;

  auto reap = [&]() {
    for (auto& c : children) {
      if (!c.running) continue;
      int status = 0;
      const pid_t r = ::waitpid(c.pid, &status, WNOHANG);
      if (r != c.pid) continue;
      c.running = false;
      // A rank that was killed never closed its libfabric shm endpoints.
      te::fabric::remove_shm_regions_of(c.pid);
      if (WIFEXITED(status)) c.exit_code = WEXITSTATUS(status);
      if (WIFSIGNALED(status)) c.term_signal = WTERMSIG(status);
      if ((c.exit_code != 0 || c.term_signal != 0) && !c.killed_by_us) {
        failed.push_back(c.rank);
        if (first_failed < 0) first_failed = static_cast<int>(&c - children.data());
      }
    }
  };

  for (;;) {
    std::vector<pollfd> fds;
    std::vector<Stream*> which;
    for (auto& s : streams) {
      if (s.fd.get() >= 0) {
        fds.push_back(pollfd{s.fd.get(), POLLIN, 0});
        which.push_back(&s);
      }
    }
    reap();
    bool any_running = false;
    for (auto& c : children) any_running = any_running || c.running;
    if (!any_running && fds.empty()) break;

    if (first_failed >= 0 && !kill_at) {
      kill_all(SIGTERM);
      kill_at = Clock::now() + std::chrono::milliseconds(opt.kill_grace_ms);
    }
    if (!timed_out && Clock::now() >= deadline) {
      timed_out = true;
      std::vector<int> running;
      for (auto& c : children) if (c.running) running.push_back(c.rank);
      std::fprintf(stderr, "ferry launcher: deadline of %d ms passed; %s still running: %s\n",
                   opt.timeout_ms, opt.launcher == LocalLauncher::mpi ? "mpirun job" : "ranks",
                   join_ranks(running).c_str());
      kill_all(SIGTERM);
      kill_at = Clock::now() + std::chrono::milliseconds(opt.kill_grace_ms);
    }
    if (g_interrupted && !interrupted) {
      interrupted = true;
      std::fprintf(stderr, "ferry launcher: interrupted (%s); stopping the ranks\n", strsignal(g_interrupted));
      kill_all(SIGTERM);
      kill_at = Clock::now() + std::chrono::milliseconds(opt.kill_grace_ms);
    }
    if (kill_at && Clock::now() >= *kill_at) kill_all(SIGKILL);

    if (fds.empty()) {
      ::usleep(10000);
      continue;
    }
    const int n = ::poll(fds.data(), fds.size(), 50);
    if (n < 0 && errno != EINTR) raise(Status::internal, errno_text("poll() on rank output"));
    for (size_t i = 0; n > 0 && i < fds.size(); ++i) {
      if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      Stream& s = *which[i];
      char buf[65536];
      const ssize_t got = ::read(s.fd.get(), buf, sizeof(buf));
      if (got > 0) {
        forward(s, buf, static_cast<size_t>(got), s.rank == 0);
      } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
        flush_partial(s);
        s.fd.reset();
      }
    }
  }

  if (timed_out) return 1;
  if (interrupted) return 128 + g_interrupted;
  if (failed.empty()) return 0;
  std::vector<int> killed;
  for (auto& c : children) if (c.killed_by_us) killed.push_back(c.rank);
  const Child& first = children[static_cast<size_t>(first_failed)];
  std::ostringstream os;
  os << "ferry launcher: " << (opt.launcher == LocalLauncher::mpi ? "mpirun job" : "rank")
     << (opt.launcher == LocalLauncher::mpi ? "" : " " + std::to_string(first.rank));
  if (first.term_signal) {
    os << " died of signal " << first.term_signal << " (" << strsignal(first.term_signal) << ")";
  } else {
    os << " exited with status " << first.exit_code;
  }
  if (opt.launcher == LocalLauncher::fork) os << "; failed ranks: " << join_ranks(failed);
  if (!killed.empty()) os << "; stopped ranks: " << join_ranks(killed);
  std::fprintf(stderr, "%s\n", os.str().c_str());
  if (first.term_signal) return 1;
  return first.exit_code;
}

}  // namespace ferry::tools
