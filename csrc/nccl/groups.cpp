#include "csrc/nccl/groups.h"

namespace ferry::nccl {

std::string check_layout(const ParallelLayout& l) {
  if (l.world_size < 1) return "world size must be at least 1, got " + std::to_string(l.world_size);
  if (l.tp_size < 1) return "tp_size must be at least 1, got " + std::to_string(l.tp_size);
  if (l.pp_size < 1) return "pp_size must be at least 1, got " + std::to_string(l.pp_size);
  if (l.world_size % (l.tp_size * l.pp_size) != 0)
    return "tp_size * pp_size = " + std::to_string(l.tp_size * l.pp_size) + " must divide the world size " +
           std::to_string(l.world_size);
  return {};
}

Group tp_group(const ParallelLayout& l, int rank) {
  Group g;
  g.id = rank / l.tp_size;
  for (int t = 0; t < l.tp_size; ++t) g.ranks.push_back(g.id * l.tp_size + t);
  g.index = rank % l.tp_size;
  return g;
}

Group pp_group(const ParallelLayout& l, int rank) {
  const int stride = l.world_size / l.pp_size;
  Group g;
  g.id = rank % stride;
  for (int s = 0; s < l.pp_size; ++s) g.ranks.push_back(g.id + s * stride);
  g.index = rank / stride;
  return g;
}

}  // namespace ferry::nccl
