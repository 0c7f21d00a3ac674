// ferry-bench as a user runs it: argument errors, --dry-run sizing at EP64, scaled-down local runs
// of both presets with --verify whose JSON is checked field by field, CSV, routing files, and the
// plot script on that JSON.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "tests/common/process.h"
#include "tests/common/shell.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using RunResult = ferry::testing::ShellResult;
using ferry::testing::run_shell;

RunResult bench(const std::string& args) { return run_shell(std::string(FERRY_BENCH) + " " + args); }

fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("ferry_bench_" + name + "_" + std::to_string(getpid()));
  fs::create_directories(dir);
  return dir;
}

json read_json(const fs::path& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << "no JSON at " << path;
  return json::parse(f);
}

// Small enough for a loaded 2-core machine: 4 ranks, 8 tokens, hidden 256, 16 experts.
const char* kScaledDown = "--local-ranks 4 --tokens 8 --hidden 256 --experts 16 --warmup 1 --iters 6 "
                          "--timeout-ms 20000 --no-progress";

void expect_ordered_stats(const json& s, const std::string& what) {
  SCOPED_TRACE(what);
  ASSERT_TRUE(s.is_object());
  EXPECT_GT(s["samples"].get<int>(), 0);
  EXPECT_GT(s["p50_us"].get<double>(), 0.0);
  EXPECT_LE(s["min_us"].get<double>(), s["p50_us"].get<double>());
  EXPECT_LE(s["p50_us"].get<double>(), s["p90_us"].get<double>());
  EXPECT_LE(s["p90_us"].get<double>(), s["p99_us"].get<double>());
  EXPECT_LE(s["p99_us"].get<double>(), s["max_us"].get<double>());
  // Half the iterations have every rank at or below the step p50, so at least half of all samples
  // are: the step p50 is never below the sample p50, and never beyond the max.
  EXPECT_GE(s["step_p50_us"].get<double>(), s["p50_us"].get<double>());
  EXPECT_LE(s["step_max_us"].get<double>(), s["max_us"].get<double>());
}

void expect_scaled_down_run(const json& j, const std::string& preset, int tokens) {
  const json& c = j["config"];
  EXPECT_EQ(c["preset"], preset);
  EXPECT_EQ(c["world_size"], 4);
  EXPECT_EQ(c["tokens"], tokens);
  EXPECT_EQ(c["hidden"], 256);
  EXPECT_EQ(c["topk"], 8);
  EXPECT_EQ(c["experts"], 16);
  EXPECT_EQ(c["in_dtype"], "fp8_e4m3");
  EXPECT_EQ(c["out_dtype"], "bf16");
  EXPECT_EQ(c["scale_block"], 128);
  EXPECT_EQ(c["backend"], "host");
  EXPECT_EQ(c["iters"], 6);
  EXPECT_EQ(c["warmup"], 1);
  EXPECT_EQ(c["verify"], true);
  for (const char* op : {"dispatch", "combine", "dispatch_send", "dispatch_recv", "combine_send", "combine_recv"}) {
    expect_ordered_stats(j["results"][op], op);
    // Every rank's samples are in the statistics: 4 ranks x 6 timed iterations.
    EXPECT_EQ(j["results"][op]["samples"], 24) << op;
    EXPECT_EQ(j["results"][op]["rank_p50_us"].size(), 4u) << op;
  }
  EXPECT_GT(j["results"]["dispatch"]["bytes_per_rank"].get<double>(), 0.0);
  EXPECT_GT(j["results"]["combine"]["bytes_per_rank"].get<double>(), 0.0);
  EXPECT_GT(j["results"]["dispatch"]["gbps_per_rank_mean"].get<double>(), 0.0);
  EXPECT_EQ(j["verify"]["requested"], true);
  EXPECT_EQ(j["verify"]["passed"], true);
  EXPECT_TRUE(j["verify"]["failed_ranks"].empty());
  EXPECT_GT(j["buffer_sizes"]["record_bytes"].get<uint64_t>(), 64u + 256u);
  EXPECT_FALSE(j["environment"]["hostname"].get<std::string>().empty());
  EXPECT_FALSE(j["environment"]["date_utc"].get<std::string>().empty());
  EXPECT_FALSE(j["environment"]["libfabric_version"].get<std::string>().empty());
}

std::string python_with_matplotlib() {
  for (const char* py : {"/usr/bin/python3", "python3"}) {
    if (run_shell(std::string(py) + " -c 'import matplotlib'").exit_code == 0) return py;
  }
  return {};
}

}  // namespace

TEST(BenchArguments, BadValuesExitWithCode2AndNameTheArgument) {
  const std::pair<const char*, const char*> cases[] = {
      {"--tokens abc", "--tokens"},
      {"--topk 9", "--topk"},
      {"--in-dtype fp4", "--in-dtype"},
      {"--backend tpu", "--backend"},
      {"--routing banana", "--routing"},
      {"--routing file", "--routing-file"},
      {"--no-such-option", "--no-such-option"},
      {"--hidden 7168 --scale-block 100", "--scale-block"},
      {"--out-dtype fp8_e4m3", "--out-dtype"},
      {"--dry-run --world-size 64 --experts 100", "--experts"},
      // --local-nodes splits --local-ranks: it needs them, and must divide them.
      {"--local-nodes 2", "--local-nodes 2 is only used with --local-ranks"},
      {"--local-ranks 4 --experts 16 --local-nodes 3", "--local-nodes 3 does not divide --local-ranks 4"},
      {"--local-ranks 4 --experts 16 --local-nodes 8", "--local-nodes 8 does not divide --local-ranks 4"},
      {"--local-ranks 4 --experts 16 --local-nodes 0", "--local-nodes"},
      {"--local-ranks 4 --experts 16 --local-nodes two", "--local-nodes"},
      // A zipf exponent that is not a finite number in [0, 10] has no law to draw from.
      {"--routing zipf --zipf-s nan", "--zipf-s"},
      {"--routing zipf --zipf-s inf", "--zipf-s"},
      {"--routing zipf --zipf-s -1", "--zipf-s"},
      {"--routing zipf --zipf-s 10.5", "--zipf-s"},
      // --overlap gemm | tbo; tbo runs the MoE layer, whose expert outputs are bf16 or f32.
      {"--overlap dbo", "--overlap"},
      {"--overlap tbo --out-dtype f16", "--out-dtype bf16 or f32"},
      {"--overlap tbo --expert-intermediate 0", "--expert-intermediate"},
  };
  for (const auto& [args, name] : cases) {
    const auto r = bench(args);
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.out;
    EXPECT_NE(r.out.find(name), std::string::npos) << args << " should name " << name << ":\n" << r.out;
  }
}

TEST(BenchArguments, HelpDocumentsPresetsAndTheRoutingFileFormat) {
  const auto r = bench("--help");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  for (const char* s : {"--preset", "--local-ranks", "--local-nodes", "FERRY_NODE_ID", "--overlap", "--routing-file",
                        "RANK E0 E1", "--dry-run"}) {
    EXPECT_NE(r.out.find(s), std::string::npos) << s;
  }
}

TEST(BenchDryRun, Ep64DecodeSizesAndTrafficAreSane) {
  const auto r = bench("--dry-run --world-size 64 --preset decode");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("EP64"), std::string::npos);
  // A record is the 64-byte header + 7168 fp8 + 56 fp32 scales = 7456 bytes.
  EXPECT_NE(r.out.find("7456"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("670.0 MiB"), std::string::npos) << "pplx-garden reference point missing";
  EXPECT_NE(r.out.find("1.9 GB"), std::string::npos) << "DeepEP reference point missing";
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(destination ranks per token: ([0-9.]+))"))) << r.out;
  const double dests = std::stod(m[1]);
  // 8 distinct experts out of 256 over 64 ranks of 4: almost always 8 ranks, never more.
  EXPECT_GT(dests, 7.0);
  EXPECT_LE(dests, 8.0);
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(total registered\s+(\d+))"))) << r.out;
  const double total = std::stod(m[1]);
  EXPECT_GT(total, 10e6);
  EXPECT_LT(total, 2e9);
  // Ferry sends each token once per rank, never more than a per-expert sender.
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(dispatch bytes\s+\S+ \S+\s+\S+ \S+\s+([0-9.]+))"))) << r.out;
  EXPECT_LE(std::stod(m[1]), 1.0);
}

TEST(BenchDryRun, JsonAndCsvHoldTheNumbersTheReportPrints) {
  const fs::path dir = temp_dir("dryrun");
  const auto r = bench("--dry-run --world-size 64 --preset decode --json " + (dir / "d.json").string() + " --csv " +
                       (dir / "d.csv").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const json j = read_json(dir / "d.json");
  EXPECT_EQ(j["mode"], "dry-run");
  EXPECT_EQ(j["config"]["world_size"], 64);
  EXPECT_EQ(j["config"]["tokens"], 128);
  const json& q = j["quantities"];
  EXPECT_EQ(q["record_bytes"].get<double>(), 7456.0);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(total registered\s+(\d+))"))) << r.out;
  EXPECT_EQ(q["total_registered_bytes"].get<double>(), std::stod(m[1]));
  ASSERT_TRUE(std::regex_search(r.out, m, std::regex(R"(destination ranks per token: ([0-9.]+))"))) << r.out;
  EXPECT_NEAR(q["dests_per_token"].get<double>(), std::stod(m[1]), 0.001);

  std::ifstream csv(dir / "d.csv");
  std::string header, line;
  ASSERT_TRUE(std::getline(csv, header));
  EXPECT_NE(header.find("world_size"), std::string::npos) << header;
  EXPECT_EQ(header.substr(header.size() - std::string("quantity,value").size()), "quantity,value") << header;
  size_t rows = 0;
  bool record_row = false;
  while (std::getline(csv, line)) {
    ++rows;
    record_row = record_row || line.find(",record_bytes,7456") != std::string::npos;
  }
  EXPECT_EQ(rows, q.size()) << "one CSV row per JSON quantity";
  EXPECT_TRUE(record_row);
  fs::remove_all(dir);
}

TEST(BenchRun, DecodePresetScaledDownVerifiesAndWritesJson) {
  const fs::path dir = temp_dir("decode");
  const auto r = bench(std::string(kScaledDown) + " --preset decode --verify --compare --json " +
                       (dir / "decode.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("verify: passed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("dispatch RECV"), std::string::npos) << r.out;
  const json j = read_json(dir / "decode.json");
  expect_scaled_down_run(j, "decode", 8);
  // Launched through mpirun when it exists: the MPI baseline ran on the same records.
  if (j["config"]["launcher"] == "local-mpi") {
    EXPECT_EQ(j["baseline"]["kind"], "mpi");
    expect_ordered_stats(j["baseline"]["dispatch"], "MPI dispatch");
    expect_ordered_stats(j["baseline"]["combine"], "MPI combine");
    EXPECT_GT(j["baseline"]["ratio_p50"]["dispatch"].get<double>(), 0.0);
    EXPECT_NE(r.out.find("ferry/MPI"), std::string::npos) << r.out;
  }
  fs::remove_all(dir);
}

TEST(BenchRun, OverlapTboTimesBothSchedulesOfTheMoeLayerVerified) {
  const fs::path dir = temp_dir("tbo");
  const auto r = bench(std::string(kScaledDown) + " --overlap tbo --expert-intermediate 32 --verify --launcher fork "
                       "--json " + (dir / "tbo.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("MoE layer (--overlap tbo)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("DS0 DR0 DS1 G0 DR1 CS0 G1 CR0 CS1 CR1"), std::string::npos) << r.out;
  const json j = read_json(dir / "tbo.json");
  EXPECT_EQ(j["config"]["overlap"], "tbo");
  EXPECT_TRUE(j["overlap"].is_null());
  const json& tbo = j["overlap_tbo"];
  EXPECT_EQ(tbo["expert_intermediate"], 32);
  EXPECT_EQ(tbo["verified"], true);
  ASSERT_EQ(tbo["handle_registered_bytes"].size(), 2u);
  ASSERT_EQ(tbo["schedules"].size(), 2u);
  EXPECT_EQ(tbo["schedules"][0]["name"], "plain");
  EXPECT_EQ(tbo["schedules"][1]["name"], "tbo");
  for (const json& s : tbo["schedules"]) {
    SCOPED_TRACE(s["name"].get<std::string>());
    for (const char* what : {"transfer", "gemm", "step"}) {
      EXPECT_GT(s[what]["p50_us"].get<double>(), 0.0) << what;
      EXPECT_LE(s[what]["min_us"].get<double>(), s[what]["p50_us"].get<double>()) << what;
      EXPECT_LE(s[what]["p50_us"].get<double>(), s[what]["max_us"].get<double>()) << what;
    }
    EXPECT_DOUBLE_EQ(s["hidden_fraction"].get<double>(),
                     1 - (s["step"]["p50_us"].get<double>() - s["gemm"]["p50_us"].get<double>()) /
                             s["transfer"]["p50_us"].get<double>());
  }
  fs::remove_all(dir);
}

TEST(BenchRun, PrefillPresetScaledDownWithOverlapAndCsv) {
  const fs::path dir = temp_dir("prefill");
  const auto r = bench(std::string(kScaledDown) + " --preset prefill --verify --overlap --gemm-m 64 --gemm-n 64 "
                       "--gemm-k 64 --launcher fork --json " + (dir / "prefill.json").string() + " --csv " +
                       (dir / "prefill.csv").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const json j = read_json(dir / "prefill.json");
  expect_scaled_down_run(j, "prefill", 8);
  EXPECT_EQ(j["config"]["overlap"], "gemm");
  EXPECT_TRUE(j["overlap_tbo"].is_null());
  EXPECT_GT(j["overlap"]["gemm_alone_p50_us"].get<double>(), 0.0);
  expect_ordered_stats(j["overlap"]["dispatch_overlapped"], "dispatch overlapped");
  expect_ordered_stats(j["overlap"]["combine_overlapped"], "combine overlapped");
  EXPECT_TRUE(j["overlap"]["dispatch_hidden_fraction"].is_number());
  // Without mpirun underneath there is no baseline, and the report says why.
  EXPECT_TRUE(j["baseline"]["kind"].is_null());
  EXPECT_NE(j["baseline"]["note"].get<std::string>().find("MPI"), std::string::npos);

  std::ifstream csv(dir / "prefill.csv");
  std::string header, line;
  ASSERT_TRUE(std::getline(csv, header));
  EXPECT_NE(header.find("p50_us"), std::string::npos);
  EXPECT_NE(header.find("env_hostname"), std::string::npos);
  int rows = 0;
  while (std::getline(csv, line)) ++rows;
  EXPECT_EQ(rows, 6 + 2) << "six ferry operations and the two overlapped steps";
  fs::remove_all(dir);
}

TEST(BenchRun, VerifyFailureExitsWithCode1NamingTheRank) {
  // Rank 2 corrupts one byte it received: its dispatch check fails naming it (and the corrupted row,
  // run through the expert, may also spoil the combine of the token's source rank).
  const auto r = bench(std::string(kScaledDown) + " --launcher fork --verify --inject-verify-fault 2");
  EXPECT_EQ(r.exit_code, 1) << r.out;
  EXPECT_NE(r.out.find("verify FAILED on rank 2: dispatch"), std::string::npos) << r.out;
  EXPECT_TRUE(std::regex_search(r.out, std::regex(R"(verify FAILED on rank\(s\) ([0-9]+,)*2(,|\n))"))) << r.out;
  EXPECT_EQ(r.out.find("dispatch: rank 1 "), std::string::npos) << "only rank 2's dispatch output was touched";
}

// The steepest zipf law the bench accepts puts nearly every draw on one expert; top-8 of 16 must
// still route every token to 8 distinct experts, in bounded time, and verify.
TEST(BenchRun, SteepestZipfLawWithTopKOfHalfTheExpertsVerifies) {
  const auto r = bench(std::string(kScaledDown) + " --launcher fork --verify --routing zipf --zipf-s 10 --topk 8");
  EXPECT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("verify"), std::string::npos) << r.out;
}

// A rank that stops (SIGSTOP: alive, silent) under the default mpirun launcher: the others reach
// their deadline, say which rank is missing, and leave without waiting for it in MPI_Finalize;
// mpirun then ends the job. The launcher's own deadline is far away, so only that path can end it
// in time.
TEST(BenchRun, AStoppedRankUnderMpirunEndsTheJobWithinItsDeadlineNamingIt) {
  if (run_shell("command -v mpirun").exit_code != 0) GTEST_SKIP() << "mpirun is not installed";
  const std::string marker = "stopped-rank-" + std::to_string(getpid());
  constexpr int kTimeoutMs = 3000;
  ferry::testing::Process job(
      {FERRY_BENCH, "--local-ranks", "3", "--launcher", "mpi", "--provider", "tcp", "--tokens", "8",
       "--hidden", "256", "--experts", "12", "--warmup", "1", "--iters", "1000000", "--no-progress",
       "--timeout-ms", std::to_string(kTimeoutMs), "--launch-timeout-ms", "600000"},
      {{"FERRY_TEST_MARKER", marker}});
  const auto start = std::chrono::steady_clock::now();
  std::vector<pid_t> rank2;
  while (rank2.empty() && std::chrono::steady_clock::now() - start < std::chrono::seconds(30)) {
    rank2 = ferry::testing::processes_with_env({{"FERRY_TEST_MARKER", marker}, {"OMPI_COMM_WORLD_RANK", "2"}});
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(rank2.size(), 1u) << "rank 2 of the mpirun job never showed up";
  // Well into the timed iterations (setup, verify inputs and warmup take about a second).
  std::this_thread::sleep_for(std::chrono::seconds(4));
  ASSERT_EQ(::kill(rank2[0], SIGSTOP), 0);
  const auto stopped = std::chrono::steady_clock::now();
  const auto r = job.wait(stopped + std::chrono::milliseconds(kTimeoutMs + 30000));
  ::kill(rank2[0], SIGKILL);  // whatever happened, no stopped process outlives the test
  EXPECT_FALSE(r.timed_out) << "the job outlived its ranks' deadline by 30 s:\n" << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  // Whichever wait the stop caught (a bootstrap barrier, an engine wait), its error names rank 2.
  EXPECT_TRUE(std::regex_search(r.output, std::regex(R"(error \(timeout\)[^\n]*ranks? ([0-9]+, )*2\b)")))
      << r.output;
}

// Under ferry-bench's own mpirun the baseline runs on the provider's counterpart (tcp: Open MPI's
// tcp BTL; shm: its shared-memory BTL), read back from MPI, and table and JSON name both sides.
TEST(BenchRun, TheMpiBaselineRunsOnTheTransportOfTheProvider) {
  if (run_shell("command -v mpirun").exit_code != 0) GTEST_SKIP() << "mpirun is not installed";
  const fs::path dir = temp_dir("transport");
  for (const auto& [provider, kind] : {std::pair{"tcp", "tcp"}, std::pair{"shm", "shared memory"}}) {
    SCOPED_TRACE(provider);
    const fs::path out = dir / (std::string(provider) + ".json");
    const auto r = bench(std::string(kScaledDown) + " --launcher mpi --provider " + provider + " --json " + out.string());
    ASSERT_EQ(r.exit_code, 0) << r.out;
    const json j = read_json(out);
    ASSERT_EQ(j["baseline"]["kind"], "mpi");
    const json& t = j["baseline"]["transport"];
    EXPECT_EQ(t["kind"], kind) << t.dump();
    EXPECT_EQ(t["matches_provider"], true) << t.dump();
    EXPECT_EQ(t["chosen_by"], "ferry-bench (matches --provider)");
    EXPECT_EQ(j["environment"]["mpi_transport"], kind);
    EXPECT_NE(j["environment"]["ferry_transport"].get<std::string>().find(std::string("libfabric ") + provider),
              std::string::npos);
    EXPECT_NE(r.out.find(std::string("transports: ferry over libfabric ") + provider), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(std::string("MPI over Open MPI")), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("WARNING"), std::string::npos) << r.out;
  }
  fs::remove_all(dir);
}

// A transport the user chose through OMPI_MCA_btl is kept, and a baseline on another transport than
// ferry's is flagged in the table and the JSON.
TEST(BenchRun, TheUsersMpiTransportIsKeptAndAMismatchIsFlagged) {
  if (run_shell("command -v mpirun").exit_code != 0) GTEST_SKIP() << "mpirun is not installed";
  const fs::path dir = temp_dir("mismatch");
  // Open MPI 4 calls its shared-memory BTL vader, 5 calls it sm.
  const std::string btl = run_shell("ompi_info | grep -q 'btl: vader'").exit_code == 0 ? "self,vader" : "self,sm";
  const auto r = run_shell("OMPI_MCA_btl=" + btl + " " + std::string(FERRY_BENCH) + " " + kScaledDown +
                           " --launcher mpi --provider tcp --json " + (dir / "m.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("OMPI_MCA_btl=" + btl + " is set"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("WARNING: MPI ran over shared memory, ferry over tcp"), std::string::npos) << r.out;
  const json j = read_json(dir / "m.json");
  const json& t = j["baseline"]["transport"];
  EXPECT_EQ(t["kind"], "shared memory") << t.dump();
  EXPECT_EQ(t["matches_provider"], false);
  EXPECT_EQ(t["chosen_by"], "OMPI_MCA_btl of the environment");
  fs::remove_all(dir);
}

TEST(BenchRun, OptionsThatDoNotFitTheWorldSizeExitWithCode2) {
  const auto r = bench("--local-ranks 3 --experts 16 --tokens 8 --hidden 256");
  EXPECT_EQ(r.exit_code, 2) << r.out;
  EXPECT_NE(r.out.find("--experts 16 is not divisible by the world size 3"), std::string::npos) << r.out;
}

TEST(BenchRun, RoutingFileIsUsedAndBadLinesAreNamed) {
  const fs::path dir = temp_dir("routing");
  {
    std::ofstream f(dir / "routing.txt");
    f << "# rank experts...\n";
    for (int rank = 0; rank < 4; ++rank) {
      for (int t = 0; t < 6; ++t) {
        f << rank;
        for (int k = 0; k < 8; ++k) f << " " << (k == 7 && t % 3 == 0 ? -1 : (rank * 3 + t + 2 * k) % 16);
        f << "\n";
      }
    }
  }
  const auto r = bench(std::string(kScaledDown) + " --launcher fork --verify --routing file --routing-file " +
                       (dir / "routing.txt").string() + " --json " + (dir / "r.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const json j = read_json(dir / "r.json");
  EXPECT_EQ(j["config"]["routing"], "file");
  EXPECT_EQ(j["verify"]["passed"], true);

  {
    std::ofstream f(dir / "bad.txt");
    f << "0 1 2 3 4 5 6 7 8\n1 1 2 3 4 5 6 7 99\n";
  }
  const auto bad = bench(std::string(kScaledDown) + " --launcher fork --routing file --routing-file " +
                         (dir / "bad.txt").string());
  EXPECT_EQ(bad.exit_code, 1) << bad.out;
  EXPECT_NE(bad.out.find("bad.txt:2: expert 99 is outside [0, 16)"), std::string::npos) << bad.out;
  fs::remove_all(dir);
}

namespace {

// --local-nodes: the ranks of this machine play two nodes, and the result file says so (the host
// backend moves the bytes the same way; what matters here is that every rank ran as its node).
void expect_two_emulated_nodes(const std::string& launcher) {
  const fs::path dir = temp_dir("nodes_" + launcher);
  const auto r = bench(std::string(kScaledDown) + " --launcher " + launcher + " --local-nodes 2 --verify --json " +
                       (dir / "nodes.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const json j = read_json(dir / "nodes.json");
  expect_scaled_down_run(j, "decode", 8);
  EXPECT_EQ(j["config"]["launcher"], "local-" + launcher);
  EXPECT_NE(r.out.find("verify: passed"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("nodes: 2 (emulated on one machine, FERRY_NODE_ID): local-node-0: ranks 0-1; "
                       "local-node-1: ranks 2-3"),
            std::string::npos)
      << r.out;
  EXPECT_EQ(j["config"]["local_nodes"], 2);
  EXPECT_EQ(j["environment"]["num_nodes"], 2);
  EXPECT_EQ(j["environment"]["num_hosts"], 1);
  EXPECT_EQ(j["environment"]["nodes_note"], "emulated on one machine, FERRY_NODE_ID");
  EXPECT_EQ(j["environment"]["rank_nodes"],
            json({"local-node-0", "local-node-0", "local-node-1", "local-node-1"}));
  fs::remove_all(dir);
}

}  // namespace

TEST(BenchLocalNodes, FourForkedRanksAsTwoNodesVerifyAndRecordEachRanksNode) {
  expect_two_emulated_nodes("fork");
}

TEST(BenchLocalNodes, FourMpirunRanksAsTwoNodesVerifyAndRecordEachRanksNode) {
  if (run_shell("command -v mpirun").exit_code != 0) GTEST_SKIP() << "mpirun is not installed";
  expect_two_emulated_nodes("mpi");
}

TEST(BenchLocalNodes, FerryNodeIdOfTheUserWinsAndTheReportSaysSo) {
  const fs::path dir = temp_dir("nodes_user");
  const auto r = run_shell("env FERRY_NODE_ID=rack7 " + std::string(FERRY_BENCH) + " " + kScaledDown +
                           " --launcher fork --local-nodes 2 --json " + (dir / "user.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_NE(r.out.find("FERRY_NODE_ID=rack7 is set"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("nodes: 1 (FERRY_NODE_ID from the environment, which wins over --local-nodes 2): "
                       "rack7: ranks 0-3"),
            std::string::npos)
      << r.out;
  const json j = read_json(dir / "user.json");
  EXPECT_EQ(j["environment"]["num_nodes"], 1);
  EXPECT_EQ(j["environment"]["rank_nodes"], json({"rack7", "rack7", "rack7", "rack7"}));
  fs::remove_all(dir);
}

TEST(BenchLocalNodes, WithoutNodeIdsTheNodesAreTheHosts) {
  const fs::path dir = temp_dir("nodes_none");
  const auto r = run_shell("env -u FERRY_NODE_ID " + std::string(FERRY_BENCH) + " " + kScaledDown +
                           " --launcher fork --json " + (dir / "plain.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(r.out.find("nodes:"), std::string::npos) << "no node line without FERRY_NODE_ID:\n" << r.out;
  const json j = read_json(dir / "plain.json");
  EXPECT_EQ(j["config"]["local_nodes"], 0);
  EXPECT_EQ(j["environment"]["num_nodes"], 1);
  EXPECT_EQ(j["environment"]["nodes_note"], "host names");
  const std::string host = j["environment"]["hostname"];
  EXPECT_EQ(j["environment"]["rank_nodes"], json({host, host, host, host}));
  fs::remove_all(dir);
}

TEST(BenchPlot, ScriptTurnsJsonIntoPngs) {
  const std::string python = python_with_matplotlib();
  if (python.empty()) GTEST_SKIP() << "matplotlib is not installed (scripts/install_deps.sh installs it)";
  const fs::path dir = temp_dir("plot");
  const auto r = bench(std::string(kScaledDown) + " --launcher fork --json " + (dir / "run.json").string());
  ASSERT_EQ(r.exit_code, 0) << r.out;
  const auto plot = run_shell(python + " " + PLOT_SCRIPT + " " + (dir / "run.json").string() + " -o " +
                                (dir / "png").string());
  ASSERT_EQ(plot.exit_code, 0) << plot.out;
  for (const char* name : {"latency_vs_ep.png", "latency_vs_tokens.png"}) {
    std::ifstream png(dir / "png" / name, std::ios::binary);
    ASSERT_TRUE(png.good()) << name;
    char magic[8] = {};
    png.read(magic, 8);
    EXPECT_EQ(std::string(magic + 1, 3), "PNG") << name;
    EXPECT_GT(fs::file_size(dir / "png" / name), 10000u) << name;
  }
  fs::remove_all(dir);
}
