#include "tests/check/check_process.h"

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace ferry::testing {

namespace fs = std::filesystem;

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

}  // namespace ferry::testing
