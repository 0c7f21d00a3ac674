// Runs a program as a real process (its own process group) with a deadline, for tests that drive
// the project's binaries: a program that hangs fails the test instead of hanging it.
#pragma once
#include <sys/types.h>

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

// The live processes whose environment holds every NAME=value of `vars` (e.g. a marker the test set
// on a launcher, and the rank variable its children got), in pid order.
std::vector<pid_t> processes_with_env(const std::map<std::string, std::string>& vars);

std::string read_text(const std::string& path);

}  // namespace ferry::testing
