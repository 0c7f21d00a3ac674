#include "bench/ep/routing.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "transfer_engine/error.h"

namespace ferry::bench {

int RoutingTable::num_tokens(int rank) const {
  return rank < static_cast<int>(indices.size()) ? static_cast<int>(indices[rank].size()) / topk : 0;
}

RoutingTable read_routing_file(const std::string& path, int world_size, int topk, int num_experts,
                               int max_tokens) {
  std::ifstream in(path);
  if (!in) raise(Status::invalid_argument, "cannot open routing file '" + path + "'");
  RoutingTable table;
  table.indices.resize(world_size);
  table.topk = topk;
  std::string line;
  int line_no = 0;
  auto fail = [&](const std::string& why) {
    raise(Status::invalid_argument, "routing file " + path + ":" + std::to_string(line_no) + ": " + why);
  };
  while (std::getline(in, line)) {
    ++line_no;
    const auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos || line[first] == '#') continue;
    std::istringstream ls(line);
    long rank;
    if (!(ls >> rank)) fail("expected `RANK E0 ... E" + std::to_string(topk - 1) + "`");
    if (rank < 0 || rank >= world_size) {
      fail("rank " + std::to_string(rank) + " is outside [0, " + std::to_string(world_size) + ")");
    }
    std::vector<int32_t> token;
    long e;
    while (ls >> e) {
      if (e < -1 || e >= num_experts) {
        fail("expert " + std::to_string(e) + " is outside [0, " + std::to_string(num_experts) + ") and not -1");
      }
      if (e >= 0 && std::find(token.begin(), token.end(), e) != token.end()) {
        fail("expert " + std::to_string(e) + " appears twice in one token");
      }
      token.push_back(static_cast<int32_t>(e));
    }
    if (!ls.eof()) fail("expected integers");
    if (static_cast<int>(token.size()) != topk) {
      fail("expected " + std::to_string(topk) + " expert ids, got " + std::to_string(token.size()));
    }
    auto& rank_indices = table.indices[rank];
    if (static_cast<int>(rank_indices.size()) / topk >= max_tokens) {
      fail("rank " + std::to_string(rank) + " has more than --tokens " + std::to_string(max_tokens) + " tokens");
    }
    rank_indices.insert(rank_indices.end(), token.begin(), token.end());
  }
  for (auto& v : table.indices) v.shrink_to_fit();
  return table;
}

RoutingGenerator::RoutingGenerator(const Options& o, int rank, int world_size)
    : o_(o), group_(rank / o.dp_size) {
  if (o.routing == RoutingMode::zipf) {
    if (!std::isfinite(o.zipf_s) || o.zipf_s < 0) {
      raise(Status::invalid_argument, "--zipf-s " + std::to_string(o.zipf_s) +
                                          " is not a finite exponent >= 0");
    }
    std::mt19937_64 rng(o.seed * 0x9e3779b97f4a7c15ull + 17);
    zipf_expert_.resize(o.experts);
    for (int e = 0; e < o.experts; ++e) zipf_expert_[e] = e;
    std::shuffle(zipf_expert_.begin(), zipf_expert_.end(), rng);
    double total = 0;
    zipf_weight_.resize(o.experts);
    zipf_cdf_.resize(o.experts);
    for (int i = 0; i < o.experts; ++i) {
      zipf_weight_[i] = 1.0 / std::pow(1.0 + i, o.zipf_s);
      total += zipf_weight_[i];
      zipf_cdf_[i] = total;
    }
    for (auto& c : zipf_cdf_) c /= total;
  }
}

int RoutingGenerator::pick_expert(std::mt19937_64& rng) {
  if (o_.routing != RoutingMode::zipf) {
    return static_cast<int>(std::uniform_int_distribution<int>(0, o_.experts - 1)(rng));
  }
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
  const auto it = std::lower_bound(zipf_cdf_.begin(), zipf_cdf_.end(), u);
  const size_t i = std::min<size_t>(it - zipf_cdf_.begin(), zipf_cdf_.size() - 1);
  return zipf_expert_[i];
}

int RoutingGenerator::pick_unused(std::mt19937_64& rng, const int32_t* taken, int num_taken) {
  auto unused = [&](int e) { return std::find(taken, taken + num_taken, e) == taken + num_taken; };
  if (o_.routing != RoutingMode::zipf) {
    // The k-th unused expert, k uniform over what is left.
    int k = std::uniform_int_distribution<int>(0, o_.experts - num_taken - 1)(rng);
    for (int e = 0; e < o_.experts; ++e) {
      if (unused(e) && k-- == 0) return e;
    }
    return -1;
  }
  // The zipf law restricted to the experts not taken yet.
  double left = 0;
  for (int i = 0; i < o_.experts; ++i) {
    if (unused(zipf_expert_[i])) left += zipf_weight_[i];
  }
  double u = std::uniform_real_distribution<double>(0.0, left)(rng);
  int last = -1;
  for (int i = 0; i < o_.experts; ++i) {
    if (!unused(zipf_expert_[i])) continue;
    last = zipf_expert_[i];
    if ((u -= zipf_weight_[i]) < 0) return last;
  }
  return last;  // rounding left u at or just above 0: the least popular unused expert
}

void RoutingGenerator::generate(int iter, int num_tokens, int32_t* indices, float* weights) {
  std::mt19937_64 rng((o_.seed + 0x5851f42d4c957f2dull * (uint64_t(iter) + 1)) ^
                      (0xd1b54a32d192ed03ull * (uint64_t(group_) + 1)));
  const int k = o_.topk;
  for (int t = 0; t < num_tokens; ++t) {
    int32_t* idx = indices + static_cast<size_t>(t) * k;
    float sum = 0;
    for (int j = 0; j < k; ++j) {
      // Distinct experts: redraw on a repeat. A steep zipf law makes repeats nearly certain (at
      // s = 10 the top expert takes 99.9% of draws), so after a few tries draw from the experts
      // not taken yet instead: every token finishes in bounded time for any exponent.
      int e = -1;
      for (int attempt = 0; attempt < kRedraws && e < 0; ++attempt) {
        const int c = pick_expert(rng);
        if (std::find(idx, idx + j, c) == idx + j) e = c;
      }
      if (e < 0) e = pick_unused(rng, idx, j);
      idx[j] = e;
      weights[static_cast<size_t>(t) * k + j] = 0.05f + std::uniform_real_distribution<float>(0.0f, 1.0f)(rng);
      sum += weights[static_cast<size_t>(t) * k + j];
    }
    for (int j = 0; j < k; ++j) weights[static_cast<size_t>(t) * k + j] /= sum;
  }
}

}  // namespace ferry::bench
