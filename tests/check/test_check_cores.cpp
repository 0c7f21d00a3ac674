// ferry-check's check that Ferry's threads and NCCL's run on separate cores (stage nccl): on this
// machine's real threads, over local ranks. Whether a split is possible depends on the CPUs here, so
// each case derives its expectation from them: with two cores per rank the split must hold (PASS,
// every rank's Ferry threads on CPUs its NCCL side does not use); with fewer it must say so (SKIP).
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "csrc/nccl/cores.h"
#include "tests/common/shell.h"

namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using nlohmann::json;

json cores_check(int ranks) {
  const fs::path path = fs::path(::testing::TempDir()) / ("check_cores_" + std::to_string(getpid()) + ".json");
  const auto r = ferry::testing::run_shell(std::string(FERRY_CHECK_BIN) + " --local-ranks " + std::to_string(ranks) +
                                           " --no-links --no-alltoall --quiet --json " + path.string());
  EXPECT_EQ(r.exit_code, 0) << r.out;
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << "no JSON at " << path << "\n" << r.out;
  const json j = json::parse(f);
  fs::remove(path);
  for (const json& c : j["checks"])
    if (c["name"] == "Ferry's threads and NCCL's on separate cores") return c;
  ADD_FAILURE() << "no cores check in the report";
  return json::object();
}

void expect_split_or_said_why(int ranks) {
  const json c = cores_check(ranks);
  ASSERT_TRUE(c.contains("metrics"));
  ASSERT_EQ(c["metrics"]["ranks"].size(), size_t(ranks));
  if (ferry::nccl::allowed_cpus().size() >= size_t(2 * ranks)) {
    EXPECT_EQ(c["verdict"], "PASS") << c.dump(2);
    EXPECT_TRUE(c["metrics"]["collisions"].empty());
    std::set<std::string> ferry_sides;
    for (const json& r : c["metrics"]["ranks"]) {
      EXPECT_NE(r["ferry"], "-") << "rank " << r["rank"] << " reported no Ferry thread";
      EXPECT_NE(r["ferry"], r["nccl"]);
      ferry_sides.insert(r["ferry"].get<std::string>());
    }
    EXPECT_EQ(ferry_sides.size(), size_t(ranks)) << "ranks of one node got the same Ferry cores";
  } else {
    EXPECT_EQ(c["verdict"], "SKIP") << c.dump(2);
    EXPECT_THAT(c["reason"].get<std::string>(), HasSubstr("too few cores to split"));
  }
}

TEST(CheckCores, OneRankSplitsItsCoresOrSaysWhyNot) { expect_split_or_said_why(1); }

TEST(CheckCores, TwoRanksSplitTheirNodesCoresOrSayWhyNot) { expect_split_or_said_why(2); }

}  // namespace
