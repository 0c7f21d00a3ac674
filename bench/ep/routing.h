// Routing of the timed iterations: fresh uniform or zipf routing every iteration (seeded by
// iteration and dp group, so the ranks of a group agree), or a fixed routing read from a file.
#pragma once
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "bench/ep/options.h"

namespace ferry::bench {

// Per rank, its tokens' expert ids ([num_tokens][topk], -1 = no route).
struct RoutingTable {
  std::vector<std::vector<int32_t>> indices;  // [world_size]
  int topk = 1;
  int num_tokens(int rank) const;
};

// Parses the --routing-file format (see --help). Throws ferry::Error(Status::invalid_argument)
// naming the file and line on a malformed line, an expert id out of range, a rank outside the
// world, a repeated expert within a token, or more than max_tokens tokens for one rank.
RoutingTable read_routing_file(const std::string& path, int world_size, int topk, int num_experts,
                               int max_tokens);

class RoutingGenerator {
 public:
  // Throws ferry::Error(Status::invalid_argument) for a zipf exponent that is negative or not finite.
  RoutingGenerator(const Options& o, int rank, int world_size);
  // Routing and weights of iteration `iter` for this rank's dp group (fresh for uniform/zipf):
  // topk distinct experts per token, drawn from the law of --routing, in bounded time for every
  // exponent.
  void generate(int iter, int num_tokens, int32_t* indices, float* weights);

 private:
  // Redraws of a repeated expert before drawing from the experts not taken yet.
  static constexpr int kRedraws = 64;
  int pick_expert(std::mt19937_64& rng);
  // One expert not among taken[0, num_taken), by the routing law restricted to those.
  int pick_unused(std::mt19937_64& rng, const int32_t* taken, int num_taken);
  Options o_;
  int group_;
  std::vector<double> zipf_weight_;  // unnormalised, in popularity order
  std::vector<double> zipf_cdf_;     // over experts in popularity order
  std::vector<int> zipf_expert_;     // popularity order -> expert id (a seeded permutation)
};

}  // namespace ferry::bench
