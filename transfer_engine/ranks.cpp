#include "transfer_engine/ranks.h"

namespace ferry::te {

std::string describe_ranks(std::span<const int> ranks, size_t max_named) {
  if (ranks.empty()) return "no rank";
  if (max_named == 0) max_named = 1;
  std::string s = ranks.size() == 1 ? "rank " : "ranks ";
  const size_t named = ranks.size() <= max_named ? ranks.size() : max_named;
  for (size_t i = 0; i < named; ++i) {
    if (i) s += ", ";
    s += std::to_string(ranks[i]);
  }
  if (ranks.size() > named) {
    const size_t others = ranks.size() - named;
    s += " and " + std::to_string(others) + (others == 1 ? " other" : " others");
  }
  return s;
}

}  // namespace ferry::te
