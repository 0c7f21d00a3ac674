// ferry-moe-layer as a user runs it (label tools): a verified local run of both schedules whose
// table and JSON are checked field by field, and argument errors that name the option.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "tests/common/shell.h"

namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using nlohmann::json;

ferry::testing::ShellResult layer(const std::string& args) {
  return ferry::testing::run_shell(std::string(FERRY_MOE_LAYER) + " " + args);
}

// Small enough for a loaded 2-core machine.
const char* kSmall = "--local-ranks 4 --tokens 8 --hidden 64 --intermediate 16 --experts 8 --topk 2 --warmup 1 "
                     "--iters 3 --timeout-ms 20000";

TEST(MoeLayerCli, VerifiedRunOfBothSchedulesPrintsTheTableAndWritesJson) {
  const fs::path path = fs::path(::testing::TempDir()) / ("moe_layer_" + std::to_string(getpid()) + ".json");
  const auto r = layer(std::string(kSmall) + " --verify --json " + path.string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("verify: PASS"));
  EXPECT_THAT(r.out, HasSubstr("transfer us"));
  EXPECT_THAT(r.out, HasSubstr("hidden"));
  EXPECT_THAT(r.out, HasSubstr("DS0 DR0 DS1 G0 DR1 CS0 G1 CR0 CS1 CR1"));

  std::ifstream f(path);
  ASSERT_TRUE(f.good()) << "no JSON at " << path;
  const json j = json::parse(f);
  EXPECT_EQ(j["config"]["world_size"], 4);
  EXPECT_EQ(j["config"]["backend"], "host");
  ASSERT_EQ(j["schedules"].size(), 2u);
  EXPECT_EQ(j["schedules"][0]["name"], "plain");
  EXPECT_EQ(j["schedules"][1]["name"], "tbo");
  for (const json& s : j["schedules"]) {
    SCOPED_TRACE(s["name"].get<std::string>());
    for (const char* what : {"step_us", "transfer_us", "gemm_us"}) {
      EXPECT_EQ(s[what]["count"], 3);
      EXPECT_GT(s[what]["p50"].get<double>(), 0.0);
      EXPECT_LE(s[what]["p50"].get<double>(), s[what]["max"].get<double>());
    }
    const double hidden = 1 - (s["step_us"]["p50"].get<double>() - s["gemm_us"]["p50"].get<double>()) /
                                  s["transfer_us"]["p50"].get<double>();
    EXPECT_DOUBLE_EQ(s["hidden_fraction"].get<double>(), hidden);
    EXPECT_GT(s["gemm_flops"].get<double>(), 0.0);
  }
  ASSERT_EQ(j["handles"].size(), 2u);
  EXPECT_GT(j["handles"][1]["registered_bytes"].get<double>(), 0.0);
  EXPECT_EQ(j["cores"]["ranks"].size(), 4u);
  EXPECT_EQ(j["verify"]["passed"], true);
  fs::remove(path);
}

TEST(MoeLayerCli, OneScheduleNeedsOneHandle) {
  const auto r = layer(std::string(kSmall) + " --schedule plain");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_THAT(r.out, HasSubstr("all-to-all handle 0"));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr("all-to-all handle 1")));
  EXPECT_THAT(r.out, ::testing::Not(HasSubstr("tbo ")));
}

TEST(MoeLayerCli, ArgumentsThatDoNotFitAreNamed) {
  auto r = layer("--local-ranks 4 --tp 3");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.out, HasSubstr("--tp 3 must divide the world size 4"));
  r = layer("--local-ranks 4 --experts 6 --topk 2");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.out, HasSubstr("--experts 6 must be a positive multiple of the world size 4"));
  r = layer("--backend cuda --out-dtype f32");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.out, HasSubstr("--out-dtype bf16"));
  r = layer("--schedule dbo");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.out, HasSubstr("--schedule"));
}

}  // namespace
