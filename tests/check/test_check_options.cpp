// ferry-check's command line: every usage error exits 2 naming the option (never CLI11's own codes,
// which read like check results), values that cannot be meant are refused, and a report that was
// asked for and cannot be written makes the run fail.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/check/check_process.h"

namespace ferry::testing {
namespace {

ProcessResult check_with(const std::vector<std::string>& args, int timeout_ms = 20000) {
  std::vector<std::string> argv{ferry_check_binary()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_process(argv, timeout_ms);
}

TEST(CheckOptions, EveryUsageErrorExitsTwoNamingTheOption) {
  struct Case {
    std::vector<std::string> args;
    std::string named;
  };
  const std::vector<Case> cases = {
      {{"--no-such-option"}, "--no-such-option"},
      {{"--timeout-ms", "soon"}, "--timeout-ms"},
      {{"--timeout-ms", "99999999999"}, "--timeout-ms"},
      {{"--local-ranks", "-2"}, "--local-ranks"},
      {{"--local-ranks", "0"}, "--local-ranks"},
      {{"--nics-per-rank", "-1"}, "--nics-per-rank"},
      {{"--nics-per-rank", "9"}, "--nics-per-rank"},
      {{"--expect-nics-per-node", "-4"}, "--expect-nics-per-node"},
      {{"--min-gbps", "-1"}, "--min-gbps"},
      {{"--min-gbps", "nan"}, "--min-gbps"},
      {{"--outlier-ratio", "1.5"}, "--outlier-ratio"},
      {{"--max-dispatch-us", "-5"}, "--max-dispatch-us"},
      {{"--max-combine-us", "inf"}, "--max-combine-us"},
      {{"--a2a-warmup", "-1"}, "--a2a-warmup"},
      {{"--latency-iters", "-3"}, "--latency-iters"},
      // Seconds times 1000 must fit the launcher's int milliseconds.
      {{"--local-ranks", "2", "--job-timeout-s", "3000000"}, "--job-timeout-s"},
      {{"--local-ranks", "2", "--job-timeout-s", "0"}, "--job-timeout-s"},
  };
  for (const Case& c : cases) {
    const ProcessResult r = check_with(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args.front() << "\n" << r.output;
    EXPECT_NE(r.output.find(c.named), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("error"), std::string::npos) << r.output;
  }
}

TEST(CheckOptions, HelpExitsZero) {
  const ProcessResult r = check_with({"--help"});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("--job-timeout-s"), std::string::npos);
}

TEST(CheckOptions, AReportPathThatCannotBeWrittenFailsBeforeAnyCheckRuns) {
  const std::string dir = make_temp_dir("unwritable");
  const std::vector<std::vector<std::string>> cases = {
      {"--json", dir + "/no-such-directory/report.json"},
      {"--html", dir},  // a directory
  };
  for (const auto& report : cases) {
    std::vector<std::string> args{"--local-ranks", "2", "--provider", "tcp", "--nics", "lo"};
    args.insert(args.end(), report.begin(), report.end());
    const ProcessResult r = check_with(args);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_NE(r.output.find("cannot write the " + report[0] + " report to " + report[1]),
              std::string::npos)
        << r.output;
    EXPECT_EQ(r.output.find("inventory:"), std::string::npos) << "checks ran before the refusal";
  }
}

// A report that fails as it is written (here: a device that is always full) fails the run even
// though every check passed.
TEST(CheckOptions, AReportThatCannotBeWrittenAfterTheRunFailsIt) {
  ProcessResult r = check_with({"--local-ranks", "1", "--topo", "--quiet", "--json", "/dev/full"}, 60000);
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_NE(r.output.find("cannot write the --json report to /dev/full"), std::string::npos) << r.output;

  const std::string dir = make_temp_dir("from-json");
  r = check_with({"--local-ranks", "1", "--topo", "--quiet", "--json", dir + "/topo.json"}, 60000);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = check_with({"--from-json", dir + "/topo.json", "--html", "/dev/full"});
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_NE(r.output.find("cannot write the --html report to /dev/full"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace ferry::testing
