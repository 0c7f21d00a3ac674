#include "bench/moe_layer/reference.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>

#include "csrc/dtype.h"
#include "csrc/reference.h"

namespace ferry::moe {

namespace {

constexpr double kU32 = 0x1.0p-24;  // fp32 unit roundoff
constexpr double kSiluSlope = 1.1;  // max |silu'(g)| = 1.0998...
constexpr double kWeightError = 16 * kU32;  // the layer's fp32 top-k softmax, relative
constexpr double kSafety = 1.5;            // on every first-order error bound
constexpr double kActivationError = 6 * kU32;  // silu(g) * u in fp32 (expf, a division, a product)

// A value the layer computes in fp32 with an error of at most `error` and then stores as bf16: the
// bf16 value the exact result rounds to, and how far the layer's stored value can be from it (0 when
// every value within the error rounds alike: the layer's bf16 is then exactly this one).
struct Rounded {
  double value;
  double spread;
};
Rounded round_bf16(double v, double error) {
  auto bf16 = [](double x) { return double(ep::dtype::round_to(ep::dtype::kBf16, float(x))); };
  const double e = kSafety * error + 2 * kU32 * std::fabs(v);  // and the double -> float step
  const double value = bf16(v), lo = bf16(v - e), hi = bf16(v + e);
  return {value, std::max(std::fabs(lo - value), std::fabs(hi - value))};
}

double gamma(int n) { return n * kU32 / (1.0 - n * kU32); }

// Top-k of every token by sorting (expert, logit) pairs: a different algorithm from the layer's.
void reference_route(const LayerShape& s, const std::vector<uint16_t>& x, std::vector<int32_t>& indices,
                     std::vector<double>& weights) {
  const int E = s.num_experts, H = s.hidden, K = s.top_k;
  indices.assign(size_t(s.tokens) * K, -1);
  weights.assign(size_t(s.tokens) * K, 0.0);
  const std::vector<float> router = router_weights(s);
  std::vector<std::pair<double, int>> order(E);
  for (int t = 0; t < s.tokens; ++t) {
    for (int e = 0; e < E; ++e) {
      double l = 0.0;
      for (int h = 0; h < H; ++h) l += double(ep::dtype::bf16_to_f32(x[size_t(t) * H + h])) * double(router[size_t(h) * E + e]);
      order[e] = {-l, e};
    }
    std::partial_sort(order.begin(), order.begin() + K, order.end());
    double sum = 0.0;
    for (int k = 0; k < K; ++k) sum += std::exp(order[0].first - order[k].first);
    for (int k = 0; k < K; ++k) {
      indices[size_t(t) * K + k] = order[k].second;
      weights[size_t(t) * K + k] = std::exp(order[0].first - order[k].first) / sum;
    }
  }
}

}  // namespace

ReferenceOutput reference_layer(const LayerShape& s, int group) {
  const int H = s.hidden, I = s.intermediate, K = s.top_k;
  ReferenceOutput r;
  r.num_tokens = s.tokens;
  r.x = hidden_states(s, group);
  std::vector<double> w;
  reference_route(s, r.x, r.indices, w);
  r.out.assign(size_t(s.tokens) * H, 0.0);
  r.tolerance.assign(size_t(s.tokens) * H, 0.0);

  const double combine_rel =
      ep::reference::combine_tolerance(a2a_config(s, 0, s.tokens)) + kWeightError;
  std::vector<float> gate_up(size_t(H) * 2 * I), down(size_t(I) * H);
  std::vector<double> xv(H), a(I), da(I), y(H), dy(H);  // a, y: the layer's bf16 values; da, dy: their spread
  // One expert at a time, over the tokens that chose it: its weights are materialised once.
  for (int e = 0; e < s.num_experts; ++e) {
    bool loaded = false;
    for (int t = 0; t < s.tokens; ++t) {
      for (int k = 0; k < K; ++k) {
        if (r.indices[size_t(t) * K + k] != e) continue;
        if (!loaded) {
          expert_weights(s, e, gate_up.data(), down.data());
          loaded = true;
        }
        for (int h = 0; h < H; ++h) xv[h] = ep::dtype::bf16_to_f32(r.x[size_t(t) * H + h]);
        for (int j = 0; j < I; ++j) {
          double g = 0, u = 0, sg = 0, su = 0;
          for (int h = 0; h < H; ++h) {
            const double wg = gate_up[size_t(h) * 2 * I + j], wu = gate_up[size_t(h) * 2 * I + I + j];
            g += xv[h] * wg;
            u += xv[h] * wu;
            sg += std::fabs(xv[h] * wg);
            su += std::fabs(xv[h] * wu);
          }
          const Rounded gb = round_bf16(g, gamma(H) * sg), ub = round_bf16(u, gamma(H) * su);
          const double silu = gb.value / (1.0 + std::exp(-gb.value));
          const double av = silu * ub.value;
          const Rounded ab = round_bf16(av, kActivationError * std::fabs(av) + kSiluSlope * std::fabs(ub.value) * gb.spread +
                                                (std::fabs(silu) + kSiluSlope * gb.spread) * ub.spread);
          a[j] = ab.value;
          da[j] = ab.spread;
        }
        for (int h = 0; h < H; ++h) {
          double v = 0, mag = 0, prop = 0;
          for (int j = 0; j < I; ++j) {
            const double wd = down[size_t(j) * H + h];
            v += a[j] * wd;
            mag += std::fabs(a[j] * wd);
            prop += da[j] * std::fabs(wd);
          }
          const double e = gamma(I) * mag + prop;
          if (s.out_dtype == FERRY_BF16) {
            const Rounded yb = round_bf16(v, e);
            y[h] = yb.value;
            dy[h] = yb.spread;
          } else {
            y[h] = v;
            dy[h] = kSafety * (e + kU32 * std::fabs(v));
          }
        }
        const double wk = w[size_t(t) * K + k];
        for (int h = 0; h < H; ++h) {
          r.out[size_t(t) * H + h] += wk * y[h];
          r.tolerance[size_t(t) * H + h] += wk * dy[h] + combine_rel * wk * (std::fabs(y[h]) + dy[h]);
        }
      }
    }
  }
  return r;
}

std::vector<int32_t> reference_expert_counts(const LayerShape& s, int rank, int num_micro_batches, int b) {
  const int per_rank = s.experts_per_rank();
  std::vector<int32_t> counts(per_rank, 0);
  const TokenRange range = micro_batch_range(s.tokens, num_micro_batches, b);
  std::vector<int32_t> indices;
  std::vector<double> w;
  for (int g = 0; g < s.num_groups(); ++g) {
    reference_route(s, hidden_states(s, g), indices, w);
    for (int t = range.begin; t < range.end; ++t) {
      for (int k = 0; k < s.top_k; ++k) {
        const int e = indices[size_t(t) * s.top_k + k];
        if (e / per_rank == rank) ++counts[e % per_rank];
      }
    }
  }
  return counts;
}

std::string compare_output(const LayerShape& s, const ReferenceOutput& want, int rank, int first,
                           const void* out_tokens, int num_tokens) {
  std::ostringstream os;
  int64_t bad = 0;
  for (int t = 0; t < num_tokens; ++t) {
    for (int h = 0; h < s.hidden; ++h) {
      const size_t i = size_t(first + t) * s.hidden + h;
      const double got = ep::dtype::load(out_tokens, s.out_dtype, int64_t(t) * s.hidden + h);
      if (std::fabs(got - want.out[i]) <= want.tolerance[i]) continue;
      if (++bad <= 8)
        os << "rank " << rank << " token " << first + t << " element " << h << ": " << got << ", want " << want.out[i]
           << " (tolerance " << want.tolerance[i] << ")\n";
    }
  }
  if (bad > 8) os << "... " << bad << " elements out of tolerance in all\n";
  return os.str();
}

}  // namespace ferry::moe
