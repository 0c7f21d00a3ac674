// Whether this machine has a usable CUDA device, asked in a child process so that the caller's
// process never initialises CUDA (a multi-process test forks its ranks afterwards, and CUDA does not
// survive fork).
#pragma once
#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

namespace ferry::testing {

inline bool cuda_device_present() {
  static const bool present = [] {
    const pid_t pid = fork();
    if (pid == 0) {
      int n = 0;
      _exit(cudaGetDeviceCount(&n) == cudaSuccess && n > 0 ? 0 : 1);
    }
    int status = 0;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return false;
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
  }();
  return present;
}

#define FERRY_REQUIRE_GPU()                                                                   \
  do {                                                                                       \
    if (!::ferry::testing::cuda_device_present())                                            \
      GTEST_SKIP() << "no CUDA device on this machine: the cuda tests run on a GPU machine"; \
  } while (0)

}  // namespace ferry::testing
