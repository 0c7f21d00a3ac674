// Command-line checks the tools share that CLI11 does not have.
#pragma once
#include <CLI/CLI.hpp>

#include <cmath>
#include <string>

namespace ferry::tools {

// A finite number in [low, high]. CLI::Range and CLI::NonNegativeNumber let nan through (every
// comparison with it is false), and nan or inf is never a count, a threshold or an exponent.
inline CLI::Validator finite_in(double low, double high) {
  return CLI::Validator(
      [low, high](std::string& text) -> std::string {
        double value = 0;
        if (!CLI::detail::lexical_cast(text, value) || !std::isfinite(value) || value < low ||
            value > high) {
          return "must be a finite number in [" + CLI::detail::to_string(low) + ", " +
                 CLI::detail::to_string(high) + "], got '" + text + "'";
        }
        return {};
      },
      "FINITE in [" + CLI::detail::to_string(low) + " - " + CLI::detail::to_string(high) + "]");
}

}  // namespace ferry::tools
