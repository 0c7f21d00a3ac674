// Runs ferry-check as a real process (or several, one per network-namespace "host") and collects its
// exit status and output, with a deadline: a checker that hangs fails the test instead of hanging it.
#pragma once
#include <chrono>
#include <map>
#include <string>
#include <vector>

namespace ferry::testing {

struct ProcessResult {
  int exit_code = -1;     // exit status; -1 when killed by a signal or the deadline
  int term_signal = 0;
  bool timed_out = false;
  double seconds = 0;     // wall time until it ended
  std::string output;     // stdout and stderr together
};

class Process {
 public:
  // argv[0] is a path or a name looked up in PATH; env entries are added to this process's
  // environment (overriding).
  Process(std::vector<std::string> argv, std::map<std::string, std::string> env = {});
  ~Process();  // kills the process group if still running
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;
  // Waits until the process ends or `deadline` passes (then SIGKILLs its process group).
  ProcessResult wait(std::chrono::steady_clock::time_point deadline);

 private:
  int pid_ = -1;
  std::string log_path_;
  std::chrono::steady_clock::time_point start_;
  bool done_ = false;
};

// One process to completion.
ProcessResult run_process(const std::vector<std::string>& argv, int timeout_ms,
                          const std::map<std::string, std::string>& env = {});

// The ferry-check binary under test.
std::string ferry_check_binary();

// ferry-check over 4 local ranks on `provider` (tcp: over "lo"), writing --json to json_path, with
// sizes small enough for a loaded 2-core machine: every check runs and verifies, the numbers do not
// matter. Tests change or append options.
std::vector<std::string> small_check_run(const std::string& provider, const std::string& json_path);

// Whether ferry-check's inventory finds a CUDA device here (what --a2a-device auto goes by).
bool machine_has_cuda_device();

// A fresh empty directory under the test temp dir.
std::string make_temp_dir(const std::string& name);

std::string read_text(const std::string& path);

}  // namespace ferry::testing
