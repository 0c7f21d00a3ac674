// The routing generator of ferry-bench's timed iterations: top-k distinct experts per token for
// every exponent --zipf-s accepts, in bounded time, following the law it was asked for.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <vector>

#include "bench/ep/options.h"
#include "bench/ep/routing.h"
#include "transfer_engine/error.h"

namespace ferry::bench {
namespace {

Options zipf(double s, int experts, int topk) {
  Options o;
  o.routing = RoutingMode::zipf;
  o.zipf_s = s;
  o.experts = experts;
  o.topk = topk;
  o.dp_size = 1;
  return o;
}

// Every token of every iteration names topk distinct experts in [0, experts).
std::vector<int32_t> generate(const Options& o, int tokens, int iter = 0) {
  RoutingGenerator g(o, 0, 1);
  std::vector<int32_t> indices(size_t(tokens) * o.topk, -7);
  std::vector<float> weights(indices.size());
  g.generate(iter, tokens, indices.data(), weights.data());
  for (int t = 0; t < tokens; ++t) {
    std::set<int32_t> seen;
    float sum = 0;
    for (int j = 0; j < o.topk; ++j) {
      const int32_t e = indices[size_t(t) * o.topk + j];
      EXPECT_GE(e, 0);
      EXPECT_LT(e, o.experts);
      EXPECT_TRUE(seen.insert(e).second) << "token " << t << " repeats expert " << e;
      sum += weights[size_t(t) * o.topk + j];
    }
    EXPECT_NEAR(sum, 1.0f, 1e-5f);
  }
  return indices;
}

// At s = 10 the top expert takes 99.9% of draws: almost every redraw repeats, and a token that
// needs every expert (topk == experts) used to depend on draws that practically never come.
TEST(ZipfRouting, EveryAcceptedExponentGivesDistinctExpertsPerToken) {
  for (double s : {0.0, 1.2, 4.0, 10.0, kMaxZipfS}) {
    SCOPED_TRACE("zipf s = " + std::to_string(s));
    generate(zipf(s, 8, 8), 256);
    generate(zipf(s, 256, 8), 256);
    generate(zipf(s, 16, 1), 256);
  }
}

// When redraws stall, the next expert comes from the law restricted to the experts not taken, not
// from the lowest expert id: at s = 10 the second pick is the second most popular expert.
TEST(ZipfRouting, ASteepLawStillPicksByPopularityWhenRedrawsStall) {
  const Options o = zipf(10.0, 64, 2);
  const std::vector<int32_t> indices = generate(o, 2000);
  std::map<std::pair<int, int>, int> pairs;
  for (size_t t = 0; t < indices.size() / 2; ++t) {
    ++pairs[{std::min(indices[2 * t], indices[2 * t + 1]), std::max(indices[2 * t], indices[2 * t + 1])}];
  }
  int most = 0;
  for (const auto& [pair, count] : pairs) most = std::max(most, count);
  // The two most popular experts carry ~99.9% and ~98% of the two picks.
  EXPECT_GT(most, 2000 * 9 / 10);
}

TEST(ZipfRouting, AnExponentWithoutALawIsRefused) {
  for (double s : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                   -1.0}) {
    EXPECT_THROW(RoutingGenerator(zipf(s, 16, 2), 0, 1), Error) << s;
  }
}

}  // namespace
}  // namespace ferry::bench
