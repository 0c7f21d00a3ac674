// Progress lines and the per-stage share every rank sends to rank 0.
#include <cstdarg>
#include <cstdio>

#include "tools/check/check.h"

namespace ferry::check {

using nlohmann::json;

static bool g_quiet = false;

void set_quiet(bool quiet) { g_quiet = quiet; }

void progress(int rank, const char* fmt, ...) {
  if (rank != 0 || g_quiet) return;
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  std::fprintf(stdout, "[ferry-check] %s\n", buf);
  std::fflush(stdout);
}

void rank_failure(int rank, const std::string& what) {
  std::fprintf(stderr, "[ferry-check] rank %d: FAIL: %s\n", rank, what.c_str());
  std::fflush(stderr);
}

json Share::to_json() const {
  return json{{"checks", checks}, {"links", links}, {"alltoall", alltoall}, {"inventory", inventory}};
}

Share Share::from_json(const json& j) {
  Share s;
  s.checks = j.value("checks", std::vector<CheckResult>{});
  s.links = j.value("links", std::vector<LinkResult>{});
  s.alltoall = j.value("alltoall", std::vector<AlltoallResult>{});
  s.inventory = j.value("inventory", std::vector<RankInventory>{});
  return s;
}

}  // namespace ferry::check
