// ferry-check: the cluster acceptance test. Launched like ferry-bench (mpirun, srun, torchrun-style
// variables, or --local-ranks N); every rank runs every stage under deadlines, rank 0 gathers the
// results between stages and writes the summary, --json and --html. Exit code 0 only when every
// check passed.
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <set>

#include "ferry/ferry.h"
#include "tools/check/check.h"
#include "tools/common/bootstrap.h"
#include "tools/common/env.h"
#include "tools/common/cli_checks.h"
#include "tools/common/launch.h"
#include "tools/common/report.h"
#include "transfer_engine/engine.h"
#include "transfer_engine/error.h"

namespace ferry::check {

using nlohmann::json;

namespace {

const char* kStages[] = {"inventory", "engines", "nic_loopback", "links", "alltoall", "nccl"};

std::string utc_now() {
  char buf[32];
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Exit codes besides 0 (every check passed) and 1 (a check failed or a rank was lost).
constexpr int kExitUsage = 2;              // a bad option, or a report path that cannot be written
constexpr int kExitReportNotWritten = 3;   // the checks ran, but a report asked for was not written
constexpr int kMaxJobTimeoutS = 7 * 24 * 3600;
constexpr int kMaxWaitMs = 3600 * 1000;

// Why `path` cannot take a report (checked before a run that may last an hour), or "".
std::string unwritable(const std::string& path) {
  const std::filesystem::path p(path);
  std::error_code ec;
  if (std::filesystem::is_directory(p, ec)) return "it is a directory";
  const std::filesystem::path dir = p.has_parent_path() ? p.parent_path() : ".";
  if (!std::filesystem::is_directory(dir, ec)) return "directory " + dir.string() + " does not exist";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return std::strerror(errno);
  ::close(fd);
  return {};
}

// Writes a whole report; on failure says which option and why.
bool write_report(const char* option, const std::string& path, const std::string& content) {
  errno = 0;
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (f) f.write(content.data(), static_cast<std::streamsize>(content.size()));
  if (f) f.close();
  if (f) return true;
  std::fprintf(stderr, "[ferry-check] error: cannot write the %s report to %s: %s\n", option,
               path.c_str(), errno ? std::strerror(errno) : "write failed");
  return false;
}

// Raised when a collective step (a gather, an engine setup) fails: the job cannot go on together.
struct Abort {
  std::string stage;
  std::string reason;
};

class Driver {
 public:
  Driver(const Options& opt, te::Bootstrap& boot) : opt_(opt), boot_(boot), me_(boot.rank()) {
    report_.version = std::to_string(FERRY_VERSION_MAJOR) + "." + std::to_string(FERRY_VERSION_MINOR);
    report_.started_utc = utc_now();
    report_.provider = opt.provider;
    report_.world_size = boot.world_size();
    report_.options = json{{"provider", opt.provider},
                           {"nics", opt.nics},
                           {"nics_per_rank", opt.nics_per_rank},
                           {"expect_nics_per_node", opt.expect_nics_per_node},
                           {"local_nodes", opt.local_nodes},
                           {"timeout_ms", opt.timeout_ms},
                           {"latency_iters", opt.latency_iters},
                           {"latency_bytes", opt.latency_bytes},
                           {"bw_bytes", opt.bw_bytes},
                           {"bw_iters", opt.bw_iters},
                           {"bw_reps", opt.bw_reps},
                           {"min_gbps", opt.min_gbps},
                           {"outlier_ratio", opt.outlier_ratio},
                           {"loopback_bytes", opt.loopback_bytes},
                           {"a2a_tokens", opt.a2a_tokens},
                           {"a2a_decode_hidden", opt.a2a_decode_hidden},
                           {"a2a_wide_hidden", opt.a2a_wide_hidden},
                           {"a2a_iters", opt.a2a_iters},
                           {"max_dispatch_us", opt.max_dispatch_us},
                           {"max_combine_us", opt.max_combine_us},
                           {"a2a_device", opt.a2a_device},
                           {"seed", opt.seed}};
  }

  int run() {
    const auto t0 = std::chrono::steady_clock::now();
    int code = 0;
    try {
      stages();
    } catch (const Abort& a) {
      code = 1;
      rank_failure(me_, "stage " + a.stage + ": " + a.reason);
      if (me_ == 0) {
        // Rank 0's own link measurements name the peers it lost, with their hosts and NICs.
        if (a.stage == "links") judge_links(opt_, report_);
        report_.add(CheckResult{"liveness", "stage " + a.stage, Verdict::fail, a.reason, json::object()});
        bool after = false;
        for (const char* s : kStages) {
          if (after && (!opt_.topo_only)) {
            report_.add(CheckResult{s, "stage " + std::string(s), Verdict::skip,
                                    "not run: stage " + a.stage + " failed", json::object()});
          }
          after = after || a.stage == s;
        }
      }
    }
    if (me_ != 0) return code;
    report_.duration_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!finish()) return kExitReportNotWritten;
    return report_.passed() ? code : 1;
  }

 private:
  void maybe_die(const char* stage) {
    if (opt_.debug_die_at == stage && opt_.debug_die_rank == me_) {
      std::fprintf(stderr, "[ferry-check] rank %d: --debug-die-at=%s: killing myself\n", me_, stage);
      std::fflush(stderr);
      ::raise(SIGKILL);
    }
    if (opt_.debug_hang_at == stage && opt_.debug_die_rank == me_) {
      std::fprintf(stderr, "[ferry-check] rank %d: --debug-hang-at=%s: hanging\n", me_, stage);
      std::fflush(stderr);
      for (;;) ::pause();
    }
  }

  // Names the host and process of every rank a failure text mentions, so "rank 3 disconnected"
  // becomes something an operator can walk up to.
  std::string with_hosts(const std::string& text) const {
    if (inventory_.empty()) return text;
    std::set<int> ranks;
    static const std::regex re("rank[s]? ([0-9]+)");
    for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it) {
      const int r = std::stoi((*it)[1].str());
      if (r >= 0 && r < int(inventory_.size()) && r != me_) ranks.insert(r);
    }
    std::string out = text;
    for (int r : ranks)
      out += " [rank " + std::to_string(r) + ": host " + inventory_[size_t(r)].host + ", pid " +
             std::to_string(inventory_[size_t(r)].pid) + "]";
    return out;
  }

  // Every rank's share of a stage, on every rank (rank 0 merges them). A failed gather means a
  // rank is gone or stuck: the job stops here.
  std::vector<Share> gather(const char* stage, const Share& mine, int waits = 2) {
    std::vector<std::string> blobs;
    try {
      blobs = tools::allgather_strings(boot_, mine.to_json().dump(), opt_.collective_timeout_ms(waits));
    } catch (const std::exception& e) {
      // What rank 0 saw itself still goes into the report (e.g. its own timeouts naming the peer).
      merge({mine});
      throw Abort{stage, with_hosts(std::string("results could not be gathered: ") + e.what())};
    }
    std::vector<Share> out;
    for (const std::string& b : blobs) out.push_back(Share::from_json(json::parse(b)));
    return out;
  }

  void merge(const std::vector<Share>& shares) {
    if (me_ != 0) return;
    for (const Share& s : shares) {
      for (const CheckResult& c : s.checks) report_.add(c);
      report_.links.insert(report_.links.end(), s.links.begin(), s.links.end());
      report_.alltoall.insert(report_.alltoall.end(), s.alltoall.begin(), s.alltoall.end());
    }
  }

  void stages() {
    // 1. Inventory.
    maybe_die("inventory");
    progress(me_, "inventory: %d ranks, provider %s", boot_.world_size(), opt_.provider.c_str());
    Share inv;
    inv.inventory.push_back(collect_inventory(opt_, boot_));
    for (const Share& s : gather("inventory", inv)) inventory_.push_back(s.inventory.at(0));
    if (me_ == 0) {
      report_.inventory = inventory_;
      std::set<std::string> hosts;
      for (const RankInventory& r : inventory_) {
        if (hosts.insert(r.host).second) report_.hosts.push_back(r.host);
      }
      for (CheckResult& c : judge_inventory(opt_, inventory_)) report_.add(std::move(c));
      if (!opt_.quiet || opt_.topo_only) std::printf("%s\n", inventory_table(report_).c_str());
      if (opt_.topo_only) {
        for (const RankInventory& r : inventory_)
          if (!r.topology.empty()) std::printf("== %s ==\n%s\n", r.host.c_str(), r.topology.c_str());
      }
    }
    if (opt_.topo_only) return;

    // 2 and 3. NICs and links, one engine per NIC slot.
    if (opt_.run_links) {
      maybe_die("engines");
      progress(me_, "engines: %d NIC slot(s)", max_slots(inventory_));
      std::unique_ptr<SlotEngines> engines;
      try {
        engines = std::make_unique<SlotEngines>(opt_, boot_, inventory_);
      } catch (const std::exception& e) {
        throw Abort{"engines", with_hosts(std::string("rank ") + std::to_string(me_) + " (" +
                                          inventory_[size_t(me_)].host + "): transfer engine setup failed: " + e.what())};
      }
      maybe_die("nic_loopback");
      progress(me_, "nic_loopback: every NIC writes to itself");
      // Each slot's loopback may fail two waits on a rank before it reaches the gather.
      merge(gather("nic_loopback", run_loopback(opt_, *engines, inventory_), 2 * engines->num_slots()));
      maybe_die("links");
      progress(me_, "links: all pairs, %d round(s) per NIC slot", num_rounds(boot_.world_size()));
      Share links;
      try {
        links = run_links(opt_, *engines, inventory_);
      } catch (const std::exception& e) {
        throw Abort{"links", with_hosts(std::string("ranks lost step between link rounds: ") + e.what())};
      }
      merge(gather("links", links));
      if (me_ == 0) judge_links(opt_, report_);
      engines.reset();
    } else if (me_ == 0) {
      report_.add(CheckResult{"links", "all pairs", Verdict::skip, "--no-links", json::object()});
    }

    // 4. All-to-all through the C API.
    if (opt_.run_alltoall) {
      maybe_die("alltoall");
      Share a2a;
      try {
        a2a = run_alltoall(opt_, boot_, inventory_);
      } catch (const std::exception& e) {
        throw Abort{"alltoall", with_hosts(e.what())};
      }
      merge(gather("alltoall", a2a));
    } else if (me_ == 0) {
      report_.add(CheckResult{"alltoall", "dispatch/combine", Verdict::skip, "--no-alltoall", json::object()});
    }

    // 5. NCCL.
    if (opt_.run_nccl) {
      maybe_die("nccl");
      progress(me_, "nccl: all_reduce");
      Share n;
      try {
        n = run_nccl(opt_, boot_, inventory_);
      } catch (const std::exception& e) {
        throw Abort{"nccl", with_hosts(e.what())};
      }
      merge(gather("nccl", n));
    } else if (me_ == 0) {
      report_.add(CheckResult{"nccl", "all_reduce sum across GPUs", Verdict::skip, "--no-nccl", json::object()});
    }
  }

  // False when a report the user asked for could not be written (the message is printed).
  bool finish() {
    std::printf("\n%s", summary_table(report_).c_str());
    std::fflush(stdout);
    bool written = true;
    if (!opt_.json_path.empty()) {
      written = write_report("--json", opt_.json_path, report_to_json(report_).dump(2) + "\n") && written;
    }
    if (!opt_.html_path.empty()) {
      written = write_report("--html", opt_.html_path, render_html(report_)) && written;
    }
    return written;
  }

  const Options& opt_;
  te::Bootstrap& boot_;
  int me_;
  std::vector<RankInventory> inventory_;
  Report report_;
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t comma = s.find(',', start);
    const std::string item = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (!item.empty()) out.push_back(item);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

}  // namespace
}  // namespace ferry::check

int main(int argc, char** argv) {
  using namespace ferry;
  check::Options opt;
  int local_ranks = 0;
  std::string launcher = "fork";
  std::string nics;
  int job_timeout_s = 1800;
  CLI::App app{"ferry-check: cluster acceptance test (inventory, NIC loopback, all-pairs links, "
               "all-to-all correctness and timing, NCCL). Exit code 0 only when every check passes."};
  app.add_option("--local-ranks", local_ranks, "start N ranks on this machine")->check(CLI::Range(1, 4096));
  int local_nodes = 0;
  app.add_option("--local-nodes", local_nodes,
                 "with --local-ranks R: the ranks play N nodes of R/N contiguous ranks (rank r gets "
                 "FERRY_NODE_ID=local-node-<r*N/R> unless FERRY_NODE_ID is set); the report names each rank's node");
  app.add_option("--launcher", launcher, "how --local-ranks starts them: fork or mpi")->check(CLI::IsMember({"fork", "mpi"}));
  app.add_option("--job-timeout-s", job_timeout_s, "--local-ranks: stop the whole job after this long (at most a week)")
      ->check(CLI::Range(1, check::kMaxJobTimeoutS));
  app.add_option("--provider", opt.provider, "libfabric provider: efa, efa-direct, tcp, shm, verbs")->envname("FERRY_PROVIDER");
  app.add_option("--nics", nics, "comma list of the NICs (domains) of every host, in slot order; default: all the provider lists");
  app.add_option("--nics-per-rank", opt.nics_per_rank, "NICs each rank uses (default: host NICs / ranks per host)")
      ->check(CLI::Range(0, te::kMaxNics));
  app.add_option("--expect-nics-per-node", opt.expect_nics_per_node, "fail a host with fewer NICs")
      ->check(CLI::Range(0, 1 << 16));
  app.add_option("--timeout-ms", opt.timeout_ms, "deadline of every wait; a peer silent this long is reported")
      ->check(CLI::Range(1, check::kMaxWaitMs));
  app.add_option("--latency-iters", opt.latency_iters, "ping-pongs per pair and NIC")->check(CLI::PositiveNumber);
  app.add_option("--latency-bytes", opt.latency_bytes, "bytes per ping (at most 64)")->check(CLI::Range(0, 64));
  app.add_option("--bw-bytes", opt.bw_bytes, "bytes per bandwidth write")->check(CLI::PositiveNumber);
  app.add_option("--bw-iters", opt.bw_iters, "bandwidth writes per direction")->check(CLI::PositiveNumber);
  app.add_option("--bw-reps", opt.bw_reps, "bandwidth bursts per direction; the fastest counts")->check(CLI::PositiveNumber);
  app.add_option("--loopback-bytes", opt.loopback_bytes, "bytes of the per-NIC loopback check")->check(CLI::PositiveNumber);
  app.add_option("--min-gbps", opt.min_gbps, "a link below this is slow (0: no floor)")->check(tools::finite_in(0, 1e6));
  app.add_option("--outlier-ratio", opt.outlier_ratio, "a link below this fraction of the median of its kind is slow (0: off)")
      ->check(tools::finite_in(0, 1));
  app.add_option("--a2a-tokens", opt.a2a_tokens, "tokens per rank of the decode shape (the wide shape uses a quarter)")->check(CLI::PositiveNumber);
  app.add_option("--a2a-decode-hidden", opt.a2a_decode_hidden, "hidden size of the decode shape")->check(CLI::PositiveNumber);
  app.add_option("--a2a-wide-hidden", opt.a2a_wide_hidden, "hidden size of the wide shape")->check(CLI::PositiveNumber);
  app.add_option("--a2a-iters", opt.a2a_iters, "timed iterations per all-to-all case")->check(CLI::PositiveNumber);
  app.add_option("--a2a-warmup", opt.a2a_warmup, "untimed (but verified) iterations per case")->check(CLI::Range(0, 1000000));
  app.add_option("--max-dispatch-us", opt.max_dispatch_us, "fail when dispatch p99 exceeds this (0: no limit)")
      ->check(tools::finite_in(0, 1e12));
  app.add_option("--max-combine-us", opt.max_combine_us, "fail when combine p99 exceeds this (0: no limit)")
      ->check(tools::finite_in(0, 1e12));
  app.add_option("--a2a-device", opt.a2a_device,
                 "backend of the all-to-all stage: host, cuda (every rank's GPU: kernels, proxy, CUDA IPC "
                 "between same-node ranks; FAIL where a rank has none) or auto (cuda when every rank has a "
                 "CUDA device, else host)")
      ->check(CLI::IsMember(check::a2a_device_names()));
  app.add_option("--seed", opt.seed, "seed of the all-to-all inputs");
  app.add_option("--nccl-bytes", opt.nccl_bytes, "bytes of the NCCL all-reduce")->check(CLI::PositiveNumber);
  bool no_links = false, no_alltoall = false, no_nccl = false;
  app.add_flag("--no-links", no_links, "skip the NIC and link checks");
  app.add_flag("--no-alltoall", no_alltoall, "skip the all-to-all checks");
  app.add_flag("--no-nccl", no_nccl, "skip the NCCL check");
  app.add_flag("--topo", opt.topo_only, "print the inventory and topology, then stop");
  app.add_option("--json", opt.json_path, "write the whole report as JSON");
  app.add_option("--html", opt.html_path, "write the report as one self-contained HTML page");
  app.add_flag("--quiet", opt.quiet, "no progress lines");
  std::string from_json;
  app.add_option("--from-json", from_json, "render an earlier --json report (summary, --html) without running checks");
  app.add_option("--debug-die-at", opt.debug_die_at, "")->group("");  // testing the checker itself
  app.add_option("--debug-hang-at", opt.debug_hang_at, "")->group("");
  app.add_option("--debug-die-rank", opt.debug_die_rank, "")->group("")->check(CLI::Range(0, 1 << 24));
  if (auto code = tools::parse_command_line(app, argc, argv, "[ferry-check]")) return *code;
  opt.nics = check::split_list(nics);
  opt.run_links = !no_links;
  opt.run_alltoall = !no_alltoall;
  opt.run_nccl = !no_nccl;
  check::set_quiet(opt.quiet);
  if (app.count("--local-nodes") > 0) {
    std::string bad;
    if (local_ranks <= 0) {
      bad = "--local-nodes " + std::to_string(local_nodes) +
            " is only used with --local-ranks (it splits the ranks started here into nodes)";
    } else {
      bad = tools::check_local_nodes(local_nodes, local_ranks);
    }
    if (!bad.empty()) {
      std::fprintf(stderr, "[ferry-check] error: %s\n", bad.c_str());
      return check::kExitUsage;
    }
  }

  try {
    // A report that cannot be written fails now, not after the checks ran; checked where it is
    // written: a run of one, the process that launches --local-ranks, or rank 0 of a launched job
    // (the other ranks may run on hosts without that directory).
    const bool writes_reports = (local_ranks > 0 && !tools::is_local_launch_child()) ||
                                !from_json.empty() || tools::discover_rank_env().rank == 0;
    for (auto [option, path] : {std::pair<const char*, const std::string*>{"--json", &opt.json_path},
                                {"--html", &opt.html_path}}) {
      if (path->empty() || !writes_reports) continue;
      if (const std::string why = check::unwritable(*path); !why.empty()) {
        std::fprintf(stderr, "[ferry-check] error: cannot write the %s report to %s: %s\n", option,
                     path->c_str(), why.c_str());
        return check::kExitUsage;
      }
    }
    if (!from_json.empty()) {
      std::ifstream in(from_json);
      if (!in) raise(Status::invalid_argument, "cannot read " + from_json);
      const check::Report report = check::report_from_json(nlohmann::json::parse(in));
      std::printf("%s", check::summary_table(report).c_str());
      if (!opt.html_path.empty() &&
          !check::write_report("--html", opt.html_path, check::render_html(report))) {
        return check::kExitReportNotWritten;
      }
      return report.passed() ? 0 : 1;
    }
    if (local_ranks > 0 && !tools::is_local_launch_child()) {
      tools::LocalLaunchOptions launch;
      launch.num_ranks = local_ranks;
      launch.launcher = launcher == "mpi" ? tools::LocalLauncher::mpi : tools::LocalLauncher::fork;
      launch.local_nodes = local_nodes;
      launch.args = tools::args_without_launch_options(argc, argv);
      launch.timeout_ms = job_timeout_s * 1000;  // both bounded above: fits an int
      // The surviving ranks report a dead one themselves; give them the time their deadlines need
      // (waits on partners that waited on the dead rank, then the gather) before the launcher
      // stops them, within the job's own deadline.
      const int64_t grace_ms = (2 * int64_t{local_ranks} + 8) * opt.timeout_ms + 5000;
      launch.kill_grace_ms = static_cast<int>(std::min<int64_t>(grace_ms, launch.timeout_ms));
      return tools::run_local_ranks(launch);
    }
    if (tools::is_local_launch_child()) {
      // The launcher's SIGTERM means "another rank failed"; reporting that is this tool's job, and
      // every wait is bounded, so finish the report instead of dying silently.
      ::signal(SIGTERM, SIG_IGN);
    }
    const tools::RankEnv env = tools::discover_rank_env();
    opt.local_nodes = tools::apply_local_nodes(env.rank, env.world_size).local_nodes;
    std::unique_ptr<te::Bootstrap> boot = tools::make_bootstrap(env, opt.timeout_ms);
    check::Driver driver(opt, *boot);
    return driver.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[ferry-check] FAIL: %s\n", e.what());
    return 2;
  }
}
