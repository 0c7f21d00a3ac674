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
  RoutingGenerator(const Options& o, int rank, int world_size);
  // Routing and weights of iteration `iter` for this rank's dp group (fresh for uniform/zipf).
  void generate(int iter, int num_tokens, int32_t* indices, float* weights);

 private:
  int pick_expert(std::mt19937_64& rng);
  Options o_;
  int group_;
  std::vector<double> zipf_cdf_;   // over experts in popularity order
  std::vector<int> zipf_expert_;   // popularity order -> expert id (a seeded permutation)
};

}  // namespace ferry::bench
