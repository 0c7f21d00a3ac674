#include "tests/check/check_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <thread>

#include <nlohmann/json.hpp>

extern char** environ;

namespace ferry::testing {

namespace fs = std::filesystem;

std::string read_text(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

namespace {
// Reports and pages the tests wrote; removed when the test program ends unless
// FERRY_KEEP_TEST_FILES is set (to look at a failing run's report).
struct TempDirs {
  std::vector<std::string> dirs;
  ~TempDirs() {
    if (std::getenv("FERRY_KEEP_TEST_FILES")) return;
    std::error_code ec;
    for (const std::string& d : dirs) fs::remove_all(d, ec);
  }
};
TempDirs& temp_dirs() {
  static TempDirs t;
  return t;
}
}  // namespace

std::string make_temp_dir(const std::string& name) {
  const char* base = std::getenv("TMPDIR");
  fs::path dir = fs::path(base ? base : "/tmp") / ("ferry-check-test-" + std::to_string(::getpid()) + "-" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  temp_dirs().dirs.push_back(dir.string());
  return dir.string();
}

std::string ferry_check_binary() { return FERRY_CHECK_BIN; }

std::vector<std::string> small_check_run(const std::string& provider, const std::string& json_path) {
  std::vector<std::string> argv = {ferry_check_binary(), "--local-ranks", "4", "--provider", provider,
                                   "--timeout-ms", "15000", "--latency-iters", "20", "--bw-bytes", "131072",
                                   "--bw-iters", "4", "--bw-reps", "2", "--loopback-bytes", "65536",
                                   "--a2a-tokens", "16", "--a2a-decode-hidden", "256", "--a2a-wide-hidden", "1024",
                                   "--a2a-iters", "2", "--a2a-warmup", "1", "--json", json_path,
                                   // Four ranks on two busy cores measure the scheduler as much as the
                                   // links; slow-link detection has its own test with a real slow link.
                                   "--outlier-ratio", "0"};
  if (provider == "tcp") argv.insert(argv.end(), {"--nics", "lo"});
  return argv;
}

bool machine_has_cuda_device() {
  const std::string dir = make_temp_dir("topo");
  const ProcessResult r =
      run_process({ferry_check_binary(), "--local-ranks", "1", "--topo", "--quiet", "--json", dir + "/topo.json"}, 30000);
  if (r.exit_code < 0) throw std::runtime_error("ferry-check --topo did not finish: " + r.output);
  const nlohmann::json j = nlohmann::json::parse(read_text(dir + "/topo.json"));
  return !j.at("inventory").at(0).at("host_gpus").empty();
}

Process::Process(std::vector<std::string> argv, std::map<std::string, std::string> env) {
  static int counter = 0;
  log_path_ = (fs::temp_directory_path() / ("ferry-check-proc-" + std::to_string(::getpid()) + "-" +
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

}  // namespace ferry::testing
