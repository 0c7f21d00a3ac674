#include "tests/common/process.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

extern char** environ;

namespace ferry::testing {

namespace fs = std::filesystem;

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

Process::Process(std::vector<std::string> argv, std::map<std::string, std::string> env) {
  static int counter = 0;
  log_path_ = (fs::temp_directory_path() / ("ferry-test-proc-" + std::to_string(::getpid()) + "-" +
                                            std::to_string(counter++) + ".log")).string();
  std::vector<std::string> envs;
  for (char** e = environ; e && *e; ++e) {
    const std::string kv(*e);
    const std::string key = kv.substr(0, kv.find('='));
    if (!env.count(key)) envs.push_back(kv);
  }
  for (const auto& [k, v] : env) envs.push_back(k + "=" + v);
  std::vector<char*> av, ev;
  for (auto& a : argv) av.push_back(a.data());
  av.push_back(nullptr);
  for (auto& e : envs) ev.push_back(e.data());
  ev.push_back(nullptr);
  const int fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + log_path_);
  start_ = std::chrono::steady_clock::now();
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    ::setpgid(0, 0);
    ::dup2(fd, STDOUT_FILENO);
    ::dup2(fd, STDERR_FILENO);
    ::execvpe(av[0], av.data(), ev.data());
    std::fprintf(stderr, "exec %s failed: %s\n", av[0], std::strerror(errno));
    ::_exit(127);
  }
  ::setpgid(pid_, pid_);
  ::close(fd);
}

Process::~Process() {
  if (!done_ && pid_ > 0) {
    ::kill(-pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  std::error_code ec;
  fs::remove(log_path_, ec);
}

ProcessResult Process::wait(std::chrono::steady_clock::time_point deadline) {
  ProcessResult r;
  int status = 0;
  for (;;) {
    const pid_t got = ::waitpid(pid_, &status, WNOHANG);
    if (got == pid_) break;
    if (std::chrono::steady_clock::now() > deadline) {
      r.timed_out = true;
      ::kill(-pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  // Whatever the process group left behind (launched ranks) goes with it.
  ::kill(-pid_, SIGKILL);
  done_ = true;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (WIFEXITED(status) && !r.timed_out) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.term_signal = WTERMSIG(status);
  r.output = read_text(log_path_);
  return r;
}

ProcessResult run_process(const std::vector<std::string>& argv, int timeout_ms,
                          const std::map<std::string, std::string>& env) {
  Process p(argv, env);
  return p.wait(std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms));
}

std::vector<pid_t> processes_with_env(const std::map<std::string, std::string>& vars) {
  std::vector<pid_t> out;
  DIR* proc = ::opendir("/proc");
  if (!proc) return out;
  while (dirent* e = ::readdir(proc)) {
    char* end = nullptr;
    const long pid = std::strtol(e->d_name, &end, 10);
    if (*end != '\0' || pid <= 0) continue;
    const std::string environ_text = read_text("/proc/" + std::string(e->d_name) + "/environ");
    size_t found = 0;
    for (size_t at = 0; at < environ_text.size();) {
      const size_t nul = environ_text.find('\0', at);
      const std::string kv = environ_text.substr(at, nul == std::string::npos ? nul : nul - at);
      const auto eq = kv.find('=');
      if (eq != std::string::npos) {
        auto it = vars.find(kv.substr(0, eq));
        if (it != vars.end() && it->second == kv.substr(eq + 1)) ++found;
      }
      if (nul == std::string::npos) break;
      at = nul + 1;
    }
    if (found == vars.size()) out.push_back(static_cast<pid_t>(pid));
  }
  ::closedir(proc);
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace ferry::testing
