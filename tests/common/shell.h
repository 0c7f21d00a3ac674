// Runs a command line for tests that drive the project's programs (ferry-bench, the launcher probe).
#pragma once
#include <string>

namespace ferry::testing {

struct ShellResult {
  int exit_code = -1;  // -1: could not start, or ended by a signal
  std::string out;     // stdout and stderr together
  double seconds = 0;  // wall time
};

// `command` runs through /bin/sh with stderr merged into stdout.
ShellResult run_shell(const std::string& command);

}  // namespace ferry::testing
