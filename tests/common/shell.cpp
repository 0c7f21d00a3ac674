#include "tests/common/shell.h"

#include <sys/wait.h>

#include <chrono>
#include <cstdio>

namespace ferry::testing {

ShellResult run_shell(const std::string& command) {
  const auto t0 = std::chrono::steady_clock::now();
  ShellResult r;
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace ferry::testing
