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

}  // namespace ferry::ep
