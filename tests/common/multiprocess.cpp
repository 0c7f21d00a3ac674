#include "tests/common/multiprocess.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <iostream>
#include <random>
#include <stdexcept>

#include "transfer_engine/error.h"
#include "transfer_engine/fabric/shm_names.h"

namespace ferry::testing {
namespace {


using Clock = std::chrono::steady_clock;

// A chatty rank must not be able to exhaust the test's memory; the tail is what explains a failure.
constexpr size_t kMaxOutputBytes = 4 << 20;

[[noreturn]] void child_fail(int rank, const std::string& what) {
  std::fprintf(stderr, "rank %d: %s\n", rank, what.c_str());
  std::fflush(stdout);
  std::fflush(stderr);
  _exit(1);
}

void enter_netns(int rank, const std::string& name) {
  std::string path = "/var/run/netns/" + name;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    child_fail(rank, "cannot open network namespace " + path + ": " + std::strerror(errno));
  if (::setns(fd, CLONE_NEWNET) != 0) {
    child_fail(rank, "setns(" + path + "): " + std::strerror(errno));
  }
  ::close(fd);
}

// Whether the current gtest test recorded a failure at or after part `first_part` (i.e. in this
// child, not in the parent before the fork).
bool failed_since(int first_part) {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  if (info == nullptr) return false;
  const ::testing::TestResult* result = info->result();
  for (int i = first_part; i < result->total_part_count(); ++i) {
    if (result->GetTestPartResult(i).failed()) return true;
  }
  return false;
}

int current_part_count() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return info == nullptr ? 0 : info->result()->total_part_count();
}

[[noreturn]] void run_child(int rank, const LaunchOptions& options,
                            const std::map<std::string, std::string>& env, const std::string& netns,
                            const std::function<void(te::Bootstrap&)>& body) {
  // Own process group, so a timeout kills whatever this rank started too.
  ::setpgid(0, 0);
  // stdout is now a pipe, fully buffered by default: a rank that crashes would lose its last lines.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  for (const auto& [key, value] : env) ::setenv(key.c_str(), value.c_str(), 1);
  if (!netns.empty()) {
    enter_netns(rank, netns);
    if (options.netns_hostname) {
      if (::unshare(CLONE_NEWUTS) != 0 || ::sethostname(netns.data(), netns.size()) != 0) {
        child_fail(rank,
                   "giving namespace " + netns + " its own host name: " + std::strerror(errno));
      }
    }
  }
  const int first_part = current_part_count();
  try {
    if (options.before_bootstrap) options.before_bootstrap(rank);
    int boot_timeout_ms =
        options.bootstrap_timeout_ms > 0 ? options.bootstrap_timeout_ms : options.timeout_ms / 2;
    auto bootstrap = te::bootstrap_from_env(boot_timeout_ms);
    body(*bootstrap);
  } catch (const ferry::Error& e) {
    child_fail(rank, std::string(e.what()) + " [" + status_name(e.status()) + "]");
  } catch (const std::exception& e) {
    child_fail(rank, e.what());
  } catch (...) {
    child_fail(rank, "unknown exception");
  }
  if (failed_since(first_part)) child_fail(rank, "a gtest assertion failed in this rank");
  std::cout.flush();
  std::fflush(stdout);
  std::fflush(stderr);
  _exit(0);
}

struct Child {
  pid_t pid = -1;
  int out_fd = -1;
  bool exited = false;
  Clock::time_point exited_at;
};

std::string describe(const RankResult& r) {
  if (r.timed_out) return "was killed after the run's deadline";
  if (r.signaled) return std::string("was killed by signal ") + strsignal(r.exit_code);
  return "exited with code " + std::to_string(r.exit_code);
}

}  // namespace

int pick_free_port() {
  // Below the kernel's ephemeral range: a port from port 0 could be handed to some other test's
  // outgoing connection between now and the moment rank 0 binds it.
  int ephemeral_low = 32768;
  if (FILE* f = std::fopen("/proc/sys/net/ipv4/ip_local_port_range", "r")) {
    if (std::fscanf(f, "%d", &ephemeral_low) != 1) ephemeral_low = 32768;
    std::fclose(f);
  }
  const int low = 10000, high = std::max(ephemeral_low, low + 1000);
  std::mt19937 rng(static_cast<unsigned>(::getpid()) * 2654435761u ^
                   static_cast<unsigned>(Clock::now().time_since_epoch().count()));
  for (int attempt = 0; attempt < 200; ++attempt) {
    int port =
        attempt < 199 ? low + static_cast<int>(rng() % static_cast<unsigned>(high - low)) : 0;
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    socklen_t len = sizeof(addr);
    bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
              ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
    ::close(fd);
    if (ok) return ntohs(addr.sin_port);
  }
  throw std::runtime_error("pick_free_port: no free TCP port found");
}

std::vector<RankResult> run_ranks(const LaunchOptions& options,
                                  const std::function<void(te::Bootstrap&)>& body) {
  if (options.world_size < 1) throw std::invalid_argument("run_ranks: world_size must be >= 1");
  const int world = options.world_size;

  std::map<std::string, std::string> base_env{
      {"MASTER_ADDR", "127.0.0.1"},
      {"MASTER_PORT", std::to_string(pick_free_port())},
      {"WORLD_SIZE", std::to_string(world)},
  };
  // Ranks in one namespace are one host; without namespaces all ranks share this host.
  std::vector<std::string> netns(static_cast<size_t>(world));
  std::map<std::string, int> per_host;
  std::vector<int> local_rank(static_cast<size_t>(world));
  for (int r = 0; r < world; ++r) {
    if (options.rank_netns) netns[r] = options.rank_netns(r);
    local_rank[r] = per_host[netns[r]]++;
  }

  std::vector<RankResult> results(static_cast<size_t>(world));
  std::vector<Child> children(static_cast<size_t>(world));
  // Buffered output would otherwise be written once by the parent and once more by every child.
  std::cout.flush();
  std::fflush(nullptr);
  for (int r = 0; r < world; ++r) {
    std::map<std::string, std::string> env = base_env;
    env["RANK"] = std::to_string(r);
    env["LOCAL_RANK"] = std::to_string(local_rank[r]);
    env["LOCAL_WORLD_SIZE"] = std::to_string(per_host[netns[r]]);
    for (const auto& [k, v] : options.env) env[k] = v;
    if (options.rank_env) {
      for (const auto& [k, v] : options.rank_env(r)) env[k] = v;
    }
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) {
      throw std::runtime_error(std::string("run_ranks: pipe: ") + std::strerror(errno));
    }
    pid_t pid = ::fork();
    if (pid < 0) {
      int err = errno;
      ::close(fds[0]);
      ::close(fds[1]);
      for (auto& c : children) {
        if (c.pid > 0) {
          ::kill(-c.pid, SIGKILL);
          ::kill(c.pid, SIGKILL);
          ::waitpid(c.pid, nullptr, 0);
          ::close(c.out_fd);
        }
      }
      throw std::runtime_error(std::string("run_ranks: fork: ") + std::strerror(err));
    }
    if (pid == 0) {
      for (int q = 0; q < r; ++q) ::close(children[q].out_fd);
      ::close(fds[0]);
      ::dup2(fds[1], STDOUT_FILENO);
      ::dup2(fds[1], STDERR_FILENO);
      ::close(fds[1]);
      run_child(r, options, env, netns[r], body);
    }
    ::setpgid(pid, pid);  // also here, so a kill right after fork reaches the group
    ::close(fds[1]);
    ::fcntl(fds[0], F_SETFL, ::fcntl(fds[0], F_GETFL) | O_NONBLOCK);
    children[r].pid = pid;
    children[r].out_fd = fds[0];
    results[r].rank = r;
  }

  auto deadline = Clock::now() + std::chrono::milliseconds(options.timeout_ms);
  // A grandchild may keep a pipe open after its rank exited; do not wait for it forever.
  constexpr auto kDrainAfterExit = std::chrono::milliseconds(1000);
  char buf[65536];
  for (;;) {
    bool busy = false;
    std::vector<pollfd> fds;
    std::vector<int> who;
    for (int r = 0; r < world; ++r) {
      Child& c = children[r];
      if (!c.exited) {
        int status = 0;
        pid_t got = ::waitpid(c.pid, &status, WNOHANG);
        if (got == c.pid) {
          c.exited = true;
          c.exited_at = Clock::now();
          results[r].signaled = WIFSIGNALED(status);
          results[r].exit_code = WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status);
        }
      }
      if (c.out_fd >= 0 && c.exited && Clock::now() - c.exited_at > kDrainAfterExit) {
        ::close(c.out_fd);
        c.out_fd = -1;
      }
      if (c.out_fd >= 0) {
        fds.push_back({c.out_fd, POLLIN, 0});
        who.push_back(r);
      }
      if (!c.exited || c.out_fd >= 0) busy = true;
    }
    if (!busy) break;
    if (Clock::now() >= deadline) {
      for (int r = 0; r < world; ++r) {
        Child& c = children[r];
        if (!c.exited) {
          ::kill(-c.pid, SIGKILL);
          ::kill(c.pid, SIGKILL);
          int status = 0;
          ::waitpid(c.pid, &status, 0);
          c.exited = true;
          results[r].timed_out = true;
          results[r].signaled = WIFSIGNALED(status);
          results[r].exit_code = WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status);
        }
        if (c.out_fd >= 0) {
          ssize_t n;
          while ((n = ::read(c.out_fd, buf, sizeof(buf))) > 0) results[r].output.append(buf, n);
          ::close(c.out_fd);
          c.out_fd = -1;
        }
      }
      break;
    }
    ::poll(fds.data(), fds.size(), 20);
    for (size_t i = 0; i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      Child& c = children[who[i]];
      std::string& out = results[who[i]].output;
      ssize_t n = ::read(c.out_fd, buf, sizeof(buf));
      if (n > 0) {
        out.append(buf, static_cast<size_t>(n));
        if (out.size() > kMaxOutputBytes) out.erase(0, out.size() - kMaxOutputBytes);
      } else if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
        ::close(c.out_fd);
        c.out_fd = -1;
      }
    }
  }
  // A rank killed mid-test cannot unlink its libfabric shm regions; with pids reused quickly they
  // would pile up in /dev/shm for the rest of the run.
  for (const Child& c : children) te::fabric::remove_shm_regions_of(c.pid);
  return results;
}

void expect_all_ok(const std::vector<RankResult>& results) {
  EXPECT_FALSE(results.empty()) << "no ranks ran";
  for (const RankResult& r : results) {
    bool ok = r.exit_code == 0 && !r.signaled && !r.timed_out;
    EXPECT_TRUE(ok) << "rank " << r.rank << " " << describe(r) << "; its output:\n" << r.output;
  }
}

}  // namespace ferry::testing
