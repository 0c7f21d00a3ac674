#include "csrc/nccl/cores.h"

#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>

#include "transfer_engine/error.h"

namespace ferry::nccl {

namespace {

std::vector<int> cpus_in(const cpu_set_t& set) {
  std::vector<int> out;
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &set)) out.push_back(c);
  return out;
}

// "0-3,8,10-11" -> {0,1,2,3,8,10,11}; nothing for text it cannot read.
std::vector<int> parse_cpu_list(const std::string& text) {
  std::vector<int> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    int lo = 0, hi = 0;
    if (std::sscanf(item.c_str(), "%d-%d", &lo, &hi) == 2) {
      for (int c = lo; c <= hi && c - lo < CPU_SETSIZE; ++c) out.push_back(c);
    } else if (std::sscanf(item.c_str(), "%d", &lo) == 1) {
      out.push_back(lo);
    }
  }
  return out;
}

std::vector<int> sorted_unique(std::vector<int> v) {
  std::sort(v.begin(), v.end());
  v.erase(std::unique(v.begin(), v.end()), v.end());
  return v;
}

void set_thread_cpus(const std::vector<int>& cpus, const char* what) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus)
    if (c >= 0 && c < CPU_SETSIZE) CPU_SET(c, &set);
  if (const int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set); rc != 0)
    raise(Status::internal, std::string(what) + ": pthread_setaffinity_np(" + cpu_text(cpus) + "): " + std::strerror(rc));
}

}  // namespace

std::vector<int> allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(getpid(), sizeof(set), &set) != 0)
    raise(Status::internal, std::string("sched_getaffinity: ") + std::strerror(errno));
  return cpus_in(set);
}

std::vector<int> thread_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (const int rc = pthread_getaffinity_np(pthread_self(), sizeof(set), &set); rc != 0)
    raise(Status::internal, std::string("pthread_getaffinity_np: ") + std::strerror(rc));
  return cpus_in(set);
}

std::vector<int> core_pool(const te::Topology& t, int gpu, const std::string& nic, const std::vector<int>& allowed) {
  std::vector<int> near;
  if (gpu >= 0 && gpu < int(t.gpus().size())) {
    near = t.cores_near(te::DeviceKind::gpu, gpu);
  } else if (!nic.empty()) {
    if (const int n = t.find_nic(nic); n >= 0) near = t.cores_near(te::DeviceKind::nic, n);
  }
  std::vector<int> pool = common_cpus(near, allowed);
  return pool.empty() ? sorted_unique(allowed) : pool;
}

bool CoreSplit::disjoint() const { return !ferry.empty() && !nccl.empty() && common_cpus(ferry, nccl).empty(); }

std::vector<std::vector<int>> physical_cores(const std::vector<int>& cpus_in) {
  const std::vector<int> cpus = sorted_unique(cpus_in);
  const std::set<int> wanted(cpus.begin(), cpus.end());
  std::set<int> placed;
  std::vector<std::vector<int>> cores;
  for (int c : cpus) {
    if (placed.count(c)) continue;
    std::ifstream f("/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/thread_siblings_list");
    std::string text;
    std::getline(f, text);
    std::vector<int> core;
    for (int s : parse_cpu_list(text))
      if (wanted.count(s) && !placed.count(s)) core.push_back(s);
    if (std::find(core.begin(), core.end(), c) == core.end()) core = {c};
    for (int s : core) placed.insert(s);
    cores.push_back(sorted_unique(core));
  }
  return cores;
}

CoreSplit split_cores(const std::vector<std::vector<int>>& cores, int share_index, int share_count, int ferry_cores) {
  if (share_count < 1 || share_index < 0 || share_index >= share_count)
    raise(Status::invalid_argument, "split_cores: share " + std::to_string(share_index) + " of " +
                                        std::to_string(share_count) + " is not a valid share");
  if (ferry_cores < 1) raise(Status::invalid_argument, "split_cores: ferry_cores must be at least 1");
  if (cores.empty()) raise(Status::invalid_argument, "split_cores: the pool has no core");
  auto flat = [](auto first, auto last) {
    std::vector<int> out;
    for (auto it = first; it != last; ++it) out.insert(out.end(), it->begin(), it->end());
    return sorted_unique(out);
  };
  CoreSplit s;
  s.pool = flat(cores.begin(), cores.end());
  s.share_index = share_index;
  s.share_count = share_count;
  const int n = int(cores.size());
  std::vector<std::vector<int>> slice;
  if (n >= share_count) {
    // Contiguous slices; the first n % share_count ranks take one core more.
    const int base = n / share_count, extra = n % share_count;
    const int begin = share_index * base + std::min(share_index, extra);
    slice.assign(cores.begin() + begin, cores.begin() + begin + base + (share_index < extra ? 1 : 0));
  } else {
    slice = {cores[size_t(share_index % n)]};
    s.note = std::to_string(share_count) + " ranks share " + std::to_string(n) + " core(s) (" + cpu_text(s.pool) +
             "): each rank gets one core, shared with other ranks";
  }
  s.slice = flat(slice.begin(), slice.end());
  if (slice.size() == 1) {
    s.ferry = s.nccl = s.slice;
    if (s.note.empty()) s.note = "this rank's slice is one core (" + cpu_text(s.slice) + "): Ferry's threads share it with the rest";
    return s;
  }
  const int k = std::min(ferry_cores, int(slice.size()) - 1);
  s.ferry = flat(slice.begin(), slice.begin() + k);
  s.nccl = flat(slice.begin() + k, slice.end());
  if (k < ferry_cores)
    s.note = "Ferry asked for " + std::to_string(ferry_cores) + " cores and got " + std::to_string(k) + " (the slice has " +
             std::to_string(slice.size()) + "; the other side keeps at least one)";
  return s;
}

CoreSplit plan_core_split(te::Bootstrap& boot, const std::string& node, const std::vector<int>& pool, int ferry_cores,
                          int timeout_ms) {
  // Fixed-size entries: node name and pool text, so one allgather carries them.
  constexpr size_t kNode = 128, kPool = 896;
  std::vector<char> mine(kNode + kPool, 0);
  const std::string pool_text = cpu_text(sorted_unique(pool));
  if (node.size() >= kNode || pool_text.size() >= kPool)
    raise(Status::invalid_argument, "plan_core_split: node name or core list too long to gather");
  std::memcpy(mine.data(), node.data(), node.size());
  std::memcpy(mine.data() + kNode, pool_text.data(), pool_text.size());
  std::vector<char> all(mine.size() * size_t(boot.world_size()));
  boot.allgather(mine.data(), mine.size(), all.data(), timeout_ms);
  int index = 0, count = 0;
  for (int r = 0; r < boot.world_size(); ++r) {
    const char* e = all.data() + size_t(r) * mine.size();
    if (std::string(e, strnlen(e, kNode)) != node || std::string(e + kNode, strnlen(e + kNode, kPool)) != pool_text)
      continue;
    if (r == boot.rank()) index = count;
    ++count;
  }
  return split_cores(physical_cores(pool), index, count, ferry_cores);
}

ScopedAffinity::ScopedAffinity(const std::vector<int>& cpus) : saved_(thread_cpus()) {
  const std::vector<int> use = common_cpus(cpus, allowed_cpus());
  if (use.empty())
    raise(Status::invalid_argument, "none of cpus " + cpu_text(cpus) + " is allowed to this process (allowed: " +
                                        cpu_text(allowed_cpus()) + ")");
  set_thread_cpus(use, "ScopedAffinity");
}

ScopedAffinity::~ScopedAffinity() {
  try {
    set_thread_cpus(saved_, "ScopedAffinity restore");
  } catch (const Error&) {
    // The mask came from this thread a moment ago; nothing left to do if the kernel refuses it now.
  }
}

std::vector<ThreadInfo> process_threads() {
  std::vector<ThreadInfo> out;
  DIR* dir = opendir("/proc/self/task");
  if (!dir) raise(Status::internal, std::string("opendir /proc/self/task: ") + std::strerror(errno));
  while (const dirent* d = readdir(dir)) {
    if (d->d_name[0] < '0' || d->d_name[0] > '9') continue;
    ThreadInfo t;
    t.tid = std::atoi(d->d_name);
    const std::string base = std::string("/proc/self/task/") + d->d_name;
    std::ifstream comm(base + "/comm");
    std::getline(comm, t.name);
    std::ifstream status(base + "/status");
    for (std::string line; std::getline(status, line);) {
      if (line.rfind("Cpus_allowed_list:", 0) == 0) t.cpus = parse_cpu_list(line.substr(line.find(':') + 1));
    }
    if (!status.is_open()) continue;  // the thread ended while we looked
    out.push_back(std::move(t));
  }
  closedir(dir);
  std::sort(out.begin(), out.end(), [](const ThreadInfo& a, const ThreadInfo& b) { return a.tid < b.tid; });
  return out;
}

std::vector<ThreadInfo> new_threads(const std::vector<ThreadInfo>& before, const std::vector<ThreadInfo>& after) {
  std::set<int> old;
  for (const auto& t : before) old.insert(t.tid);
  std::vector<ThreadInfo> out;
  for (const auto& t : after)
    if (!old.count(t.tid)) out.push_back(t);
  return out;
}

std::vector<int> cpus_of(const std::vector<ThreadInfo>& threads) {
  std::vector<int> all;
  for (const auto& t : threads) all.insert(all.end(), t.cpus.begin(), t.cpus.end());
  return sorted_unique(all);
}

std::vector<int> common_cpus(const std::vector<int>& a, const std::vector<int>& b) {
  const std::vector<int> x = sorted_unique(a), y = sorted_unique(b);
  std::vector<int> out;
  std::set_intersection(x.begin(), x.end(), y.begin(), y.end(), std::back_inserter(out));
  return out;
}

std::vector<RankCores> gather_rank_cores(te::Bootstrap& boot, const RankCores& mine, int timeout_ms) {
  // Fixed-size text entries: "node|ferry cpus|other cpus".
  constexpr size_t kEntry = 2048;
  const std::string text = mine.node + "|" + cpu_text(mine.ferry) + "|" + cpu_text(mine.other);
  if (text.size() >= kEntry) raise(Status::invalid_argument, "gather_rank_cores: node name or core lists too long");
  std::vector<char> in(kEntry, 0), all(kEntry * size_t(boot.world_size()));
  std::memcpy(in.data(), text.data(), text.size());
  boot.allgather(in.data(), kEntry, all.data(), timeout_ms);
  std::vector<RankCores> out;
  for (int r = 0; r < boot.world_size(); ++r) {
    const char* e = all.data() + size_t(r) * kEntry;
    const std::string t(e, strnlen(e, kEntry));
    const size_t a = t.find('|'), b = t.find('|', a + 1);
    if (a == std::string::npos || b == std::string::npos)
      raise(Status::peer_failed, "gather_rank_cores: rank " + std::to_string(r) + " sent a malformed entry");
    RankCores rc;
    rc.rank = r;
    rc.node = t.substr(0, a);
    rc.ferry = parse_cpu_list(t.substr(a + 1, b - a - 1));
    rc.other = parse_cpu_list(t.substr(b + 1));
    out.push_back(std::move(rc));
  }
  return out;
}

std::vector<std::string> core_collisions(const std::vector<RankCores>& ranks, const std::string& other_name) {
  std::vector<std::string> lines;
  for (const RankCores& f : ranks) {
    for (const RankCores& o : ranks) {
      if (f.node != o.node) continue;
      const std::vector<int> shared = common_cpus(f.ferry, o.other);
      if (shared.empty()) continue;
      lines.push_back(f.node + ": Ferry's threads of rank " + std::to_string(f.rank) + " (CPUs " + cpu_text(f.ferry) +
                      ") and " + other_name + "'s of rank " + std::to_string(o.rank) + " (CPUs " + cpu_text(o.other) +
                      ") share CPU " + cpu_text(shared));
    }
  }
  return lines;
}

std::string cpu_text(const std::vector<int>& cpus) { return cpus.empty() ? "-" : te::format_cpu_list(sorted_unique(cpus)); }

}  // namespace ferry::nccl
