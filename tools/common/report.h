// Small output helpers shared by the tools: aligned text tables, sample statistics, and gathering
// per-rank numbers through the bootstrap.
#pragma once
#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <vector>

#include "transfer_engine/bootstrap.h"

namespace ferry::tools {

class Table {
 public:
  enum class Align { left, right };
  void add_column(std::string header, Align align = Align::right);
  // Missing trailing cells print empty; extra cells are an error (Status::invalid_argument).
  void add_row(std::vector<std::string> cells);
  // A horizontal rule between row groups.
  void add_separator();
  std::string render() const;
  void print(std::FILE* out = stdout) const;
  size_t num_rows() const { return rows_.size(); }

 private:
  std::vector<std::string> headers_;
  std::vector<Align> aligns_;
  std::vector<std::vector<std::string>> rows_;  // an empty row is a separator
};

// printf-style formatting into a std::string.
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// "1.5 KiB", "670.0 MiB", "1.90 GiB".
std::string format_bytes(double bytes);

struct Percentiles {
  size_t count = 0;
  double min = 0, mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};
// Nearest-rank percentiles (p-th: the smallest sample with at least p% of samples at or below it),
// so every reported value is a measured sample. Empty input gives all zeros.
Percentiles percentiles(std::vector<double> samples);

// Every rank contributes `values` (counts may differ); every rank gets all ranks' values, rank-major,
// and per_rank_counts (optional) how many came from each rank. Two allgathers: the counts, then the
// values padded to the largest count.
std::vector<double> allgather_values(te::Bootstrap& bootstrap, std::span<const double> values,
                                     int timeout_ms, std::vector<int>* per_rank_counts = nullptr);
std::vector<uint64_t> allgather_u64(te::Bootstrap& bootstrap, uint64_t value, int timeout_ms);
std::vector<std::string> allgather_strings(te::Bootstrap& bootstrap, const std::string& value,
                                           int timeout_ms);

}  // namespace ferry::tools
