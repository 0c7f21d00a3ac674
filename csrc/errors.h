// How csrc words its errors: every message starts with where it happened, "rank R step S
// OPERATION: ", so a user reading one line of one rank's log knows which rank, which step and which
// call failed. Built here only; nothing else spells that prefix.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "transfer_engine/error.h"

namespace ferry::ep {

struct Site {
  int rank = -1;               // -1: no rank yet (sizing a config, a handle that is not one)
  int64_t step = -1;           // -1: outside a step (creation, teardown)
  std::string_view operation;  // "dispatch SEND", "ferry_a2a_create", ...; may be empty
};

// "rank 2 step 5 dispatch RECV: what" (the parts that are unknown are left out).
std::string describe(const Site& site, std::string_view what);
[[noreturn]] void fail(Status status, const Site& site, std::string_view what);

// Bounded rank lists in messages: te::describe_ranks (transfer_engine/ranks.h).

}  // namespace ferry::ep
