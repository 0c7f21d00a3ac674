#include "csrc/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "csrc/backend.h"
#include "csrc/dtype.h"

namespace ferry::ep::reference {
namespace {

// splitmix64: tiny, and the same sequence on every platform and standard library.
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return double(next() >> 11) * 0x1.0p-53; }
  int below(int n) { return int(next() % uint64_t(n)); }
};

uint64_t mix(uint64_t a, uint64_t b) { return Rng(a * 0x100000001b3ull ^ (b + 0x51ed27ull)).next(); }

// Expert order of the zipf law and the hot expert depend on the seed only: every group agrees.
std::vector<int> zipf_order(int num_experts, uint64_t seed) {
  std::vector<int> order(num_experts);
  for (int i = 0; i < num_experts; ++i) order[i] = i;
  Rng rng(mix(seed, 0x21ff));
  for (int i = num_experts - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
  return order;
}

}  // namespace

RankInput generate_input(const ferry_a2a_config_t& c, const InputSpec& spec, int rank) {
  const Layout l = make_layout([&] { auto cc = c; cc.rank = rank; return cc; }());
  const int group = l.dp_group(rank);
  Rng rng(mix(spec.seed, uint64_t(group) + 1));
  RankInput in;
  in.num_tokens = l.max_tokens;
  if (spec.vary_tokens) in.num_tokens = rng.below(l.max_tokens + 1);
  if (spec.zero_tokens_every > 0 && group % spec.zero_tokens_every == spec.zero_tokens_every - 1) in.num_tokens = 0;
  const int T = in.num_tokens, K = l.top_k, E = l.num_experts;

  in.x.assign(size_t(T) * l.payload_bytes, 0);
  for (int64_t i = 0; i < int64_t(T) * l.hidden; ++i)
    dtype::store(in.x.data(), l.in_dtype, i, float(rng.uniform() * 8.0 - 4.0));
  if (l.num_scales > 0) {
    in.x_scale.resize(size_t(T) * l.num_scales);
    for (auto& s : in.x_scale) s = float(0.25 + rng.uniform() * 1.75);
  }

  std::vector<double> cdf;
  std::vector<int> order;
  if (spec.routing == Routing::zipf) {
    order = zipf_order(E, spec.seed);
    double acc = 0;
    for (int i = 0; i < E; ++i) cdf.push_back(acc += 1.0 / std::pow(1.0 + i, spec.zipf_s));
    for (auto& v : cdf) v /= acc;
  }
  const int hot = Rng(mix(spec.seed, 0x407)).below(E);
  in.indices.assign(size_t(T) * K, -1);
  in.weights.assign(size_t(T) * K, 0.0f);
  for (int t = 0; t < T; ++t) {
    int32_t* row = &in.indices[size_t(t) * K];
    for (int k = 0; k < K; ++k) {
      int e;
      do {
        if (k == 0 && spec.routing == Routing::one_expert) {
          e = hot;
        } else if (spec.routing == Routing::zipf) {
          const double u = rng.uniform();
          e = order[std::min<int>(E - 1, int(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin()))];
        } else {
          e = rng.below(E);
        }
      } while (std::find(row, row + k, e) != row + k);
      row[k] = e;
      in.weights[size_t(t) * K + k] = float(rng.uniform());
    }
    if (spec.drop_fraction > 0) {
      for (int k = 0; k < K; ++k)
        if (rng.uniform() < spec.drop_fraction) row[k] = -1;
      if (t % 7 == 3) std::fill(row, row + K, -1);
    }
  }
  return in;
}

std::vector<RankInput> generate_all(const ferry_a2a_config_t& c, const InputSpec& spec) {
  std::vector<RankInput> all;
  for (int r = 0; r < c.world_size; ++r) {
    if (c.dp_size > 1 && r % c.dp_size != 0) all.push_back(all.back());
    else all.push_back(generate_input(c, spec, r));
  }
  return all;
}

DispatchResult dispatch(const ferry_a2a_config_t& c, std::span<const RankInput> inputs, int rank) {
  auto cc = c;
  cc.rank = rank;
  const Layout l = make_layout(cc);
  const int epr = l.experts_per_rank, K = l.top_k;
  DispatchResult out;
  out.expert_num_tokens.assign(epr, 0);
  out.expert_padded_rows.assign(epr, 0);
  out.expert_x.assign(size_t(epr) * l.max_rows_per_expert * l.payload_bytes, 0);
  out.expert_x_scale.assign(size_t(epr) * l.max_rows_per_expert * l.num_scales, 0.0f);
  for (int e = 0; e < epr; ++e) {
    const int expert = rank * epr + e;
    int row = 0;
    for (int s = 0; s < l.world_size; ++s) {
      const RankInput& in = inputs[s];
      for (int t = l.dp_member(s); t < in.num_tokens; t += l.dp_size) {
        const int32_t* idx = &in.indices[size_t(t) * K];
        if (std::find(idx, idx + K, expert) == idx + K) continue;
        const size_t dst = size_t(e) * l.max_rows_per_expert + row;
        std::memcpy(&out.expert_x[dst * l.payload_bytes], &in.x[size_t(t) * l.payload_bytes], l.payload_bytes);
        if (l.num_scales > 0)
          std::memcpy(&out.expert_x_scale[dst * l.num_scales], &in.x_scale[size_t(t) * l.num_scales],
                      l.scale_bytes);
        ++row;
      }
    }
    out.expert_num_tokens[e] = row;
    out.expert_padded_rows[e] = int(align_up(uint64_t(row), l.expert_alignment));
  }
  return out;
}

std::vector<float> combine(const ferry_a2a_config_t& c, std::span<const RankInput> inputs, int rank,
                           const ExpertRowFn& expert_y) {
  auto cc = c;
  cc.rank = rank;
  const Layout l = make_layout(cc);
  const int K = l.top_k, epr = l.experts_per_rank;
  const RankInput& mine = inputs[rank];
  const int group_first = rank - l.dp_member(rank);
  std::vector<float> out(size_t(mine.num_tokens) * l.hidden, 0.0f);
  for (int t = 0; t < mine.num_tokens; ++t) {
    const int src = group_first + t % l.dp_size;
    for (int k = 0; k < K; ++k) {
      const int expert = mine.indices[size_t(t) * K + k];
      if (expert < 0) continue;
      // Row of (src, t) at its expert: routes to that expert from earlier senders, then from
      // earlier tokens of the same sender.
      int row = 0;
      for (int s = 0; s <= src; ++s) {
        const RankInput& in = inputs[s];
        const int end = s == src ? t : in.num_tokens;
        for (int u = l.dp_member(s); u < end; u += l.dp_size) {
          const int32_t* idx = &in.indices[size_t(u) * K];
          if (std::find(idx, idx + K, expert) != idx + K) ++row;
        }
      }
      const void* y = expert_y(owner_rank(expert, epr), local_expert(expert, epr), row);
      const float w = mine.weights[size_t(t) * K + k];
      for (int h = 0; h < l.hidden; ++h) out[size_t(t) * l.hidden + h] += w * dtype::load(y, l.out_dtype, h);
    }
  }
  return out;
}

float expert_gain(int expert) { return 0.5f + 0.125f * float(expert % 11) * (expert % 2 ? -1.0f : 1.0f); }

void apply_expert(const Layout& l, int expert, const void* x_row, const float* scale_row, void* y_row) {
  const float gain = expert_gain(expert);
  for (int h = 0; h < l.hidden; ++h) {
    float v = dtype::load(x_row, l.in_dtype, h);
    if (l.num_scales > 0) v *= scale_row[h / l.scale_block];
    dtype::store(y_row, l.out_dtype, h, v * gain);
  }
}

void apply_experts(const Layout& l, const int32_t* expert_num_tokens, const void* expert_x,
                   const float* expert_x_scale, void* expert_y) {
  for (int e = 0; e < l.experts_per_rank; ++e) {
    const int rows = int(align_up(uint64_t(expert_num_tokens[e]), l.expert_alignment));
    for (int r = 0; r < rows; ++r) {
      const size_t row = size_t(e) * l.max_rows_per_expert + r;
      apply_expert(l, l.rank * l.experts_per_rank + e, static_cast<const uint8_t*>(expert_x) + row * l.payload_bytes,
                   l.num_scales > 0 ? expert_x_scale + row * l.num_scales : nullptr,
                   static_cast<uint8_t*>(expert_y) + row * l.out_row_bytes());
    }
  }
}

namespace {
template <class Fn>
std::vector<float> standard_sum(const ferry_a2a_config_t& c, const RankInput& in, Fn term) {
  const Layout l = make_layout(c);
  const int K = l.top_k;
  std::vector<float> out(size_t(in.num_tokens) * l.hidden, 0.0f);
  std::vector<uint8_t> y(l.out_row_bytes());
  for (int t = 0; t < in.num_tokens; ++t) {
    for (int k = 0; k < K; ++k) {
      const int e = in.indices[size_t(t) * K + k];
      if (e < 0) continue;
      apply_expert(l, e, &in.x[size_t(t) * l.payload_bytes],
                   l.num_scales > 0 ? &in.x_scale[size_t(t) * l.num_scales] : nullptr, y.data());
      const float w = in.weights[size_t(t) * K + k];
      for (int h = 0; h < l.hidden; ++h) out[size_t(t) * l.hidden + h] += term(w * dtype::load(y.data(), l.out_dtype, h));
    }
  }
  return out;
}
}  // namespace

std::vector<float> combine_standard(const ferry_a2a_config_t& c, const RankInput& in) {
  return standard_sum(c, in, [](float v) { return v; });
}
std::vector<float> combine_magnitude_standard(const ferry_a2a_config_t& c, const RankInput& in) {
  return standard_sum(c, in, [](float v) { return std::fabs(v); });
}

std::string compare_dispatch(const ferry_a2a_config_t& c, const DispatchResult& want,
                             const int32_t* expert_num_tokens, const void* expert_x, const float* expert_x_scale) {
  const Layout l = make_layout(c);
  std::ostringstream os;
  int reported = 0;
  for (int e = 0; e < l.experts_per_rank && reported < 8; ++e) {
    if (expert_num_tokens[e] != want.expert_num_tokens[e]) {
      os << "rank " << l.rank << " local expert " << e << ": " << expert_num_tokens[e] << " rows, want "
         << want.expert_num_tokens[e] << "\n";
      ++reported;
      continue;
    }
    for (int r = 0; r < want.expert_padded_rows[e] && reported < 8; ++r) {
      const size_t row = size_t(e) * l.max_rows_per_expert + r;
      const auto* got = static_cast<const uint8_t*>(expert_x) + row * l.payload_bytes;
      const auto* exp = &want.expert_x[row * l.payload_bytes];
      if (std::memcmp(got, exp, l.payload_bytes) != 0) {
        size_t b = 0;
        while (got[b] == exp[b]) ++b;
        os << "rank " << l.rank << " local expert " << e << " row " << r << (r >= want.expert_num_tokens[e] ? " (padding)" : "")
           << ": byte " << b << " is " << int(got[b]) << ", want " << int(exp[b]) << "\n";
        ++reported;
      }
      if (l.num_scales > 0 &&
          std::memcmp(expert_x_scale + row * l.num_scales, &want.expert_x_scale[row * l.num_scales], l.scale_bytes) != 0) {
        os << "rank " << l.rank << " local expert " << e << " row " << r << ": scales differ\n";
        ++reported;
      }
    }
  }
  return os.str();
}

double combine_tolerance(const ferry_a2a_config_t& c) {
  const Layout l = make_layout(c);
  const double eps = l.out_dtype == dtype::kBf16 ? 0x1.0p-8 : l.out_dtype == dtype::kF16 ? 0x1.0p-11 : 0x1.0p-20;
  return eps * (l.max_dests_per_token() + 2);
}

std::string compare_combine(const ferry_a2a_config_t& c, std::span<const float> want, std::span<const float> magnitude,
                            const void* out_tokens, int num_tokens) {
  const Layout l = make_layout(c);
  const double tol = combine_tolerance(c);
  std::ostringstream os;
  int reported = 0;
  for (int64_t i = 0; i < int64_t(num_tokens) * l.hidden && reported < 8; ++i) {
    const double got = dtype::load(out_tokens, l.out_dtype, i);
    const double mag = magnitude.empty() ? std::fabs(want[i]) : magnitude[i];
    const double allowed = tol * mag + 1e-6;
    if (!(std::fabs(got - want[i]) <= allowed)) {
      os << "rank " << l.rank << " token " << i / l.hidden << " element " << i % l.hidden << ": " << got << ", want "
         << want[i] << " (tolerance " << allowed << ")\n";
      ++reported;
    }
  }
  return os.str();
}

}  // namespace ferry::ep::reference
