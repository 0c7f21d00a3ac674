#include "tests/common/netns.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <utility>

namespace ferry::testing {
namespace {

std::atomic<int> g_cluster_counter{0};

std::string join(const std::vector<std::string>& argv) {
  std::string s;
  for (const auto& a : argv) s += (s.empty() ? "" : " ") + a;
  return s;
}

// Runs a command that must succeed; its output becomes the exception text otherwise.
void must(const std::vector<std::string>& argv) {
  std::string output;
  int rc = run_command(argv, &output);
  if (rc != 0) {
    throw std::runtime_error("netns: `" + join(argv) + "` failed (exit " + std::to_string(rc) +
                             "): " + output);
  }
}

// Namespaces left behind by a test process that was killed (ctest timeout, SIGKILL) are removed by
// the next cluster: their names carry the pid, and that pid no longer exists.
void remove_stale_namespaces() {
  std::string list;
  if (run_command({"ip", "netns", "list"}, &list) != 0) return;
  std::istringstream lines(list);
  std::string line;
  while (std::getline(lines, line)) {
    std::string name = line.substr(0, line.find(' '));
    if (name.rfind("ferry", 0) != 0) continue;
    size_t digits_end = 5;
    while (digits_end < name.size() && std::isdigit(static_cast<unsigned char>(name[digits_end]))) {
      ++digits_end;
    }
    if (digits_end == 5 || digits_end >= name.size() ||
        (name[digits_end] != 'c' && name[digits_end] != '-')) {
      continue;
    }
    pid_t pid = static_cast<pid_t>(std::stol(name.substr(5, digits_end - 5)));
    if (::kill(pid, 0) != 0 && errno == ESRCH) {
      std::string ignored;
      run_command({"ip", "netns", "del", name}, &ignored);
    }
  }
}

}  // namespace

int run_command(const std::vector<std::string>& argv, std::string* output) {
  if (argv.empty()) throw std::invalid_argument("run_command: empty argv");
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) {
    throw std::runtime_error(std::string("run_command: pipe: ") + std::strerror(errno));
  }
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = ::fork();
  if (pid < 0) {
    int err = errno;
    ::close(fds[0]);
    ::close(fds[1]);
    throw std::runtime_error(std::string("run_command: fork: ") + std::strerror(err));
  }
  if (pid == 0) {
    ::dup2(fds[1], STDOUT_FILENO);
    ::dup2(fds[1], STDERR_FILENO);
    ::execvp(args[0], args.data());
    std::string msg = std::string("cannot run ") + args[0] + ": " + std::strerror(errno) + "\n";
    (void)!::write(STDERR_FILENO, msg.data(), msg.size());
    _exit(127);
  }
  ::close(fds[1]);
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fds[0], buf, sizeof(buf));
    if (n > 0) {
      out.append(buf, static_cast<size_t>(n));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (output) *output = out;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

NetnsAvailability NetnsCluster::available() {
  static std::once_flag once;
  static NetnsAvailability result;
  std::call_once(once, [] {
    if (::geteuid() != 0) {
      result = {false, "network namespaces need root (CAP_SYS_ADMIN); run the netns tests as root"};
      return;
    }
    std::string output;
    if (run_command({"ip", "-V"}, &output) != 0) {
      result = {false, "iproute2's `ip` is not usable: " + output};
      return;
    }
    // Probe what a cluster needs: a namespace and a bridge inside it.
    std::string probe = "ferry" + std::to_string(::getpid()) + "-probe";
    if (run_command({"ip", "netns", "add", probe}, &output) != 0) {
      result = {false, "cannot create a network namespace (`ip netns add`): " + output};
      return;
    }
    std::string bridge_output;
    int rc =
        run_command({"ip", "-n", probe, "link", "add", "fsw0", "type", "bridge"}, &bridge_output);
    run_command({"ip", "netns", "del", probe}, &output);
    if (rc != 0) {
      result = {false, "cannot create a Linux bridge in a namespace: " + bridge_output};
      return;
    }
    result = {true, ""};
  });
  return result;
}

NetnsCluster::NetnsCluster(int hosts, int nics_per_host) : hosts_(hosts), nics_(nics_per_host) {
  if (hosts < 1 || hosts > kMaxHosts || nics_per_host < 1 || nics_per_host > kMaxNics) {
    throw std::invalid_argument("NetnsCluster: hosts must be in [1, " + std::to_string(kMaxHosts) +
                                "] and nics_per_host in [1, " + std::to_string(kMaxNics) + "]");
  }
  remove_stale_namespaces();
  prefix_ = "ferry" + std::to_string(::getpid()) + "c" + std::to_string(g_cluster_counter++);
  switch_ns_ = prefix_ + "-sw";
  for (int h = 0; h < hosts; ++h) host_ns_.push_back(prefix_ + "-host" + std::to_string(h));
  try {
    must({"ip", "netns", "add", switch_ns_});
    created_ns_.push_back(switch_ns_);
    must({"ip", "-n", switch_ns_, "link", "set", "lo", "up"});
    for (int n = 0; n < nics_; ++n) {
      std::string bridge = "fsw" + std::to_string(n);
      must({"ip", "-n", switch_ns_, "link", "add", bridge, "type", "bridge"});
      must({"ip", "-n", switch_ns_, "link", "set", bridge, "up"});
    }
    for (int h = 0; h < hosts; ++h) {
      must({"ip", "netns", "add", host_ns_[h]});
      created_ns_.push_back(host_ns_[h]);
      must({"ip", "-n", host_ns_[h], "link", "set", "lo", "up"});
      for (int n = 0; n < nics_; ++n) {
        // Both ends are created directly inside their namespaces: no name is ever taken in the
        // caller's namespace, so concurrent clusters cannot collide there.
        must({"ip", "link", "add", interface(h, n), "netns", host_ns_[h], "type", "veth", "peer",
              "name", switch_port(h, n), "netns", switch_ns_});
        must({"ip", "-n", switch_ns_, "link", "set", switch_port(h, n), "master",
              "fsw" + std::to_string(n)});
        must({"ip", "-n", switch_ns_, "link", "set", switch_port(h, n), "up"});
        must({"ip", "-n", host_ns_[h], "addr", "add",
              address(h, n) + "/" + std::to_string(prefix_length()), "dev", interface(h, n)});
        must({"ip", "-n", host_ns_[h], "link", "set", interface(h, n), "up"});
      }
    }
  } catch (...) {
    teardown();
    throw;
  }
}

NetnsCluster::~NetnsCluster() {
  teardown();
}

void NetnsCluster::teardown() noexcept {
  // Deleting a namespace destroys the veth ends inside it, and with them their peers.
  for (auto it = created_ns_.rbegin(); it != created_ns_.rend(); ++it) {
    std::string ignored;
    try {
      run_command({"ip", "netns", "del", *it}, &ignored);
    } catch (...) {
    }
  }
  created_ns_.clear();
}

void NetnsCluster::check_index(int host, int nic) const {
  if (host < 0 || host >= hosts_ || nic < 0 || nic >= nics_) {
    throw std::out_of_range("NetnsCluster: no host " + std::to_string(host) + " nic " +
                            std::to_string(nic) + " in a " + std::to_string(hosts_) + "x" +
                            std::to_string(nics_) + " cluster");
  }
}

const std::string& NetnsCluster::netns(int host) const {
  check_index(host, 0);
  return host_ns_[host];
}

std::string NetnsCluster::interface(int host, int nic) const {
  check_index(host, nic);
  return "fnic" + std::to_string(nic);
}

std::string NetnsCluster::address(int host, int nic) const {
  check_index(host, nic);
  return "198.18." + std::to_string(nic) + "." + std::to_string(host + 1);
}

std::string NetnsCluster::switch_port(int host, int nic) const {
  check_index(host, nic);
  return "h" + std::to_string(host) + "n" + std::to_string(nic);
}

void NetnsCluster::set_rate(int host, int nic, const std::string& rate) {
  check_index(host, nic);
  // tbf on both veth ends limits both directions. The bucket holds 64 KiB: above one GSO
  // segment, small enough that a transfer of a few MiB runs at the configured rate.
  for (const auto& [ns, dev] : {std::pair{switch_ns_, switch_port(host, nic)},
                                std::pair{host_ns_[host], interface(host, nic)}}) {
    must({"tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst",
          "64kb", "latency", "100ms"});
  }
}

void NetnsCluster::clear_rate(int host, int nic) {
  check_index(host, nic);
  for (const auto& [ns, dev] : {std::pair{switch_ns_, switch_port(host, nic)},
                                std::pair{host_ns_[host], interface(host, nic)}}) {
    std::string ignored;  // no qdisc to delete is fine
    run_command({"tc", "-n", ns, "qdisc", "del", "dev", dev, "root"}, &ignored);
  }
}

void NetnsCluster::set_down(int host, int nic) {
  must({"ip", "-n", switch_ns_, "link", "set", switch_port(host, nic), "down"});
}

void NetnsCluster::set_up(int host, int nic) {
  must({"ip", "-n", switch_ns_, "link", "set", switch_port(host, nic), "up"});
}

}  // namespace ferry::testing
