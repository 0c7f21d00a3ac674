// Command-line checks the tools share that CLI11 does not have.
#pragma once
#include <CLI/CLI.hpp>

#include <cmath>
#include <cstdio>
#include <optional>
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

// Parses the command line. nullopt: the program goes on; otherwise its exit code: 0 after --help
// (printed to stdout), 2 after a usage error (named on stderr after `prefix`). CLI11's own exit
// codes (104, 105, 109, ...) would read as a tool's results, so every usage error is 2.
inline std::optional<int> parse_command_line(CLI::App& app, int argc, const char* const* argv,
                                             const char* prefix) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "%s error: %s\nRun with --help for the options.\n", prefix, e.what());
    return 2;
  }
  return std::nullopt;
}

}  // namespace ferry::tools
