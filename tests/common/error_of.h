// The ferry::Error an operation throws, so a test can check its status and text.
#pragma once
#include <optional>

#include "transfer_engine/error.h"

namespace ferry::testing {

// Runs `op`; returns the ferry::Error it threw, or nothing when it returned normally.
template <typename Op>
std::optional<Error> error_of(Op&& op) {
  try {
    op();
  } catch (const Error& e) {
    return e;
  }
  return std::nullopt;
}

}  // namespace ferry::testing
