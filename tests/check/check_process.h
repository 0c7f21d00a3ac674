// ferry-check under test: its binary, a small healthy run, and the files its reports go to. Processes
// are run by tests/common/process.h.
#pragma once
#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "tests/common/process.h"

namespace ferry::testing {

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

}  // namespace ferry::testing
