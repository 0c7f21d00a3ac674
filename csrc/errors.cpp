#include "csrc/errors.h"

namespace ferry::ep {

std::string describe(const Site& site, std::string_view what) {
  std::string text;
  if (site.rank >= 0) text = "rank " + std::to_string(site.rank);
  if (site.step >= 0) text += (text.empty() ? "step " : " step ") + std::to_string(site.step);
  if (!site.operation.empty()) {
    if (!text.empty()) text += ' ';
    text += site.operation;
  }
  if (!text.empty()) text += ": ";
  text += what;
  return text;
}

void fail(Status status, const Site& site, std::string_view what) { raise(status, describe(site, what)); }

std::string describe_ranks(std::span<const int> ranks, size_t shown) {
  std::string text;
  const size_t named = ranks.size() < shown ? ranks.size() : shown;
  for (size_t i = 0; i < named; ++i) {
    if (i > 0) text += i + 1 == ranks.size() ? " and " : ", ";
    text += std::to_string(ranks[i]);
  }
  if (ranks.size() > named) text += " and " + std::to_string(ranks.size() - named) + " more";
  return text;
}

}  // namespace ferry::ep
