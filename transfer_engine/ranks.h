// Rank lists in error text: name the first few ranks a user has to go and look at, count the rest,
// so a message stays short at any world size.
#pragma once
#include <cstddef>
#include <span>
#include <string>

namespace ferry::te {

// "rank 2", "ranks 2, 5, 7", or "ranks 2, 5, 7 and 1021 others" when more than max_named are given;
// "no rank" for an empty list. Ranks are named in the order given.
std::string describe_ranks(std::span<const int> ranks, size_t max_named = 8);

}  // namespace ferry::te
