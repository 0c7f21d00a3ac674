#include "tools/common/report.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstring>
#include <numeric>

#include "transfer_engine/error.h"

namespace ferry::tools {

void Table::add_column(std::string header, Align align) {
  headers_.push_back(std::move(header));
  aligns_.push_back(align);
}

void Table::add_row(std::vector<std::string> cells) {
  if (cells.size() > headers_.size()) {
    raise(Status::invalid_argument, "table row has " + std::to_string(cells.size()) +
                                        " cells but the table has " + std::to_string(headers_.size()) +
                                        " columns");
  }
  cells.resize(headers_.size());
  rows_.push_back(std::move(cells));
}

void Table::add_separator() { rows_.emplace_back(); }

std::string Table::render() const {
  std::vector<size_t> width(headers_.size());
  for (size_t c = 0; c < headers_.size(); ++c) width[c] = headers_[c].size();
  for (const auto& row : rows_) {
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  auto line = [&](const std::vector<std::string>& cells) {
    std::string out;
    for (size_t c = 0; c < headers_.size(); ++c) {
      const std::string& s = cells[c];
      const std::string pad(width[c] - s.size(), ' ');
      if (c) out += "  ";
      out += aligns_[c] == Align::left ? s + pad : pad + s;
    }
    while (!out.empty() && out.back() == ' ') out.pop_back();
    return out + "\n";
  };
  size_t total = 0;
  for (size_t c = 0; c < width.size(); ++c) total += width[c] + (c ? 2 : 0);
  const std::string rule = std::string(total, '-') + "\n";
  std::string out = line(headers_) + rule;
  for (const auto& row : rows_) out += row.empty() ? rule : line(row);
  return out;
}

void Table::print(std::FILE* out) const {
  const std::string s = render();
  std::fwrite(s.data(), 1, s.size(), out);
  std::fflush(out);
}

std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  va_list ap2;
  va_copy(ap2, ap);
  const int n = std::vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  std::string s(n > 0 ? static_cast<size_t>(n) : 0, '\0');
  if (n > 0) std::vsnprintf(s.data(), s.size() + 1, fmt, ap2);
  va_end(ap2);
  return s;
}

std::string format_bytes(double bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (std::fabs(bytes) >= 1024.0 && u < 4) {
    bytes /= 1024.0;
    ++u;
  }
  return u == 0 ? format("%.0f B", bytes) : format(u >= 3 ? "%.2f %s" : "%.1f %s", bytes, kUnits[u]);
}

Percentiles percentiles(std::vector<double> samples) {
  Percentiles p;
  if (samples.empty()) return p;
  std::sort(samples.begin(), samples.end());
  const size_t n = samples.size();
  auto at = [&](double q) {
    size_t idx = static_cast<size_t>(std::ceil(q * static_cast<double>(n)));
    idx = std::clamp<size_t>(idx, 1, n);
    return samples[idx - 1];
  };
  p.count = n;
  p.min = samples.front();
  p.max = samples.back();
  p.mean = std::accumulate(samples.begin(), samples.end(), 0.0) / static_cast<double>(n);
  p.p50 = at(0.50);
  p.p90 = at(0.90);
  p.p99 = at(0.99);
  return p;
}

std::vector<uint64_t> allgather_u64(te::Bootstrap& bootstrap, uint64_t value, int timeout_ms) {
  std::vector<uint64_t> out(static_cast<size_t>(bootstrap.world_size()));
  bootstrap.allgather(&value, sizeof(value), out.data(), timeout_ms);
  return out;
}

std::vector<double> allgather_values(te::Bootstrap& bootstrap, std::span<const double> values,
                                     int timeout_ms, std::vector<int>* per_rank_counts) {
  const auto counts = allgather_u64(bootstrap, values.size(), timeout_ms);
  const uint64_t max_count = *std::max_element(counts.begin(), counts.end());
  std::vector<double> padded(max_count, 0.0);
  std::copy(values.begin(), values.end(), padded.begin());
  std::vector<double> all(max_count * counts.size());
  if (max_count > 0) {
    bootstrap.allgather(padded.data(), max_count * sizeof(double), all.data(), timeout_ms);
  }
  std::vector<double> out;
  if (per_rank_counts) per_rank_counts->clear();
  for (size_t r = 0; r < counts.size(); ++r) {
    out.insert(out.end(), all.begin() + static_cast<ptrdiff_t>(r * max_count),
               all.begin() + static_cast<ptrdiff_t>(r * max_count + counts[r]));
    if (per_rank_counts) per_rank_counts->push_back(static_cast<int>(counts[r]));
  }
  return out;
}

std::vector<std::string> allgather_strings(te::Bootstrap& bootstrap, const std::string& value,
                                           int timeout_ms) {
  const auto sizes = allgather_u64(bootstrap, value.size(), timeout_ms);
  const uint64_t max_size = std::max<uint64_t>(1, *std::max_element(sizes.begin(), sizes.end()));
  std::string padded = value;
  padded.resize(max_size, '\0');
  std::string all(max_size * sizes.size(), '\0');
  bootstrap.allgather(padded.data(), max_size, all.data(), timeout_ms);
  std::vector<std::string> out;
  for (size_t r = 0; r < sizes.size(); ++r) out.push_back(all.substr(r * max_size, sizes[r]));
  return out;
}

}  // namespace ferry::tools
