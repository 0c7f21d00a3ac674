#include "csrc/reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iomanip>
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

// The nonnegative finite fp8 e4m3 values in code order (0 .. 126), from the format's definition.
const std::vector<double>& fp8_values() {
  static const std::vector<double> values = [] {
    std::vector<double> v;
    for (int code = 0; code <= 126; ++code) {
      const int e = code >> 3, m = code & 7;
      v.push_back(e == 0 ? std::ldexp(double(m), -9) : std::ldexp(1.0 + m / 8.0, e - 7));
    }
    return v;
  }();
  return values;
}

float from_bf16(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// bf16 inputs for quantize on dispatch: each block of its own magnitude, every 5th block zero,
// every 5th token with a +inf and a -inf (they saturate) and a -0.
void quantized_input(const Layout& l, Rng& rng, RankInput& in) {
  in.x.assign(size_t(in.num_tokens) * l.hidden * 2, 0);
  auto* x = reinterpret_cast<uint16_t*>(in.x.data());
  for (int t = 0; t < in.num_tokens; ++t) {
    uint16_t* row = x + size_t(t) * l.hidden;
    for (int b = 0; b < l.num_scales; ++b) {
      if (b % 5 == 4) continue;
      const int exponent = rng.below(41) - 20;
      for (int i = b * l.scale_block; i < (b + 1) * l.scale_block; ++i)
        row[i] = dtype::f32_to_bf16(std::ldexp(float(rng.uniform() * 8.0 - 4.0), exponent));
    }
    if (t % 5 == 2 && l.hidden > 10) {
      row[3] = 0x7f80;   // +inf
      row[10] = 0xff80;  // -inf
      row[1] = 0x8000;   // -0
    }
  }
}

}  // namespace

uint8_t nearest_fp8(float v) {
  if (std::isnan(v)) return 0x7f;  // the canonical NaN, whatever the sign
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const std::vector<double>& values = fp8_values();
  const double a = std::fabs(double(v));
  if (a >= values.back()) return uint8_t(sign | 126);
  const int hi = int(std::upper_bound(values.begin(), values.end(), a) - values.begin());
  const int lo = hi - 1;
  const double below = a - values[lo], above = values[hi] - a;
  const int code = below < above ? lo : above < below ? hi : (lo % 2 == 0 ? lo : hi);
  return uint8_t(sign | code);
}

QuantizedToken quantize_token(const uint16_t* x, int hidden, int scale_block, bool round_scale) {
  QuantizedToken out;
  out.q.resize(size_t(hidden));
  for (int b = 0; b < hidden / scale_block; ++b) {
    float amax = FERRY_QUANTIZE_AMAX_FLOOR;
    for (int i = b * scale_block; i < (b + 1) * scale_block; ++i) {
      const float v = from_bf16(x[i]);
      if (std::isfinite(v)) amax = std::max(amax, std::fabs(v));
    }
    float scale = amax * (1.0f / 448.0f), multiplier = 448.0f / amax;
    if (round_scale) {
      int e = 0;
      const float m = std::frexp(scale, &e);  // scale = m * 2^e, m in [0.5, 1)
      const int p = m == 0.5f ? e - 1 : e;
      scale = std::ldexp(1.0f, p);
      multiplier = std::ldexp(1.0f, -p);
    }
    out.scale.push_back(scale);
    for (int i = b * scale_block; i < (b + 1) * scale_block; ++i) out.q[size_t(i)] = nearest_fp8(from_bf16(x[i]) * multiplier);
  }
  return out;
}

RankInput generate_input(const ferry_a2a_config_t& c, const InputSpec& spec, int rank) {
  constexpr int kMaxRedraws = 64;
  const Layout l = make_layout([&] { auto cc = c; cc.rank = rank; return cc; }());
  const int group = l.dp_group(rank);
  Rng rng(mix(spec.seed, uint64_t(group) + 1));
  RankInput in;
  in.num_tokens = l.max_tokens;
  if (spec.vary_tokens) in.num_tokens = rng.below(l.max_tokens + 1);
  if (spec.zero_tokens_every > 0 && group % spec.zero_tokens_every == spec.zero_tokens_every - 1) in.num_tokens = 0;
  const int T = in.num_tokens, K = l.top_k, E = l.num_experts;

  if (spec.quantize) {
    in.quantize = true;
    in.round_scale = spec.round_scale == RoundScale::all || (spec.round_scale == RoundScale::odd_groups && group % 2 == 1);
    quantized_input(l, rng, in);
  } else {
    in.x.assign(size_t(T) * l.payload_bytes, 0);
    for (int64_t i = 0; i < int64_t(T) * l.hidden; ++i)
      dtype::store(in.x.data(), l.in_dtype, i, float(rng.uniform() * 8.0 - 4.0));
  }
  if (l.num_scales > 0 && !spec.quantize) {
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
      auto taken = [&](int x) { return std::find(row, row + k, x) != row + k; };
      int e = -1;
      // Redraws end: a steep zipf law (s = 10 puts nearly all mass on one expert) would otherwise
      // redraw forever for the second route; then the law restricted to the untaken experts decides.
      for (int attempt = 0; attempt < kMaxRedraws && (e < 0 || taken(e)); ++attempt) {
        if (k == 0 && spec.routing == Routing::one_expert) {
          e = hot;
        } else if (spec.routing == Routing::zipf) {
          const double u = rng.uniform();
          e = order[std::min<int>(E - 1, int(std::lower_bound(cdf.begin(), cdf.end(), u) - cdf.begin()))];
        } else {
          e = rng.below(E);
        }
      }
      if (taken(e)) {
        auto weight = [&](int i) { return spec.routing == Routing::zipf ? 1.0 / std::pow(1.0 + i, spec.zipf_s) : 1.0; };
        double left = 0;
        for (int i = 0; i < E; ++i)
          if (!taken(order.empty() ? i : order[i])) left += weight(i);
        double u = rng.uniform() * left;
        for (int i = 0; i < E; ++i) {
          const int candidate = order.empty() ? i : order[i];
          if (taken(candidate)) continue;
          e = candidate;
          if ((u -= weight(i)) < 0) break;
        }
      }
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
  out.expert_src_token.assign(size_t(epr) * l.max_rows_per_expert, -1);
  out.expert_num_tokens_per_rank.assign(size_t(epr) * l.world_size, 0);
  for (int e = 0; e < epr; ++e) {
    const int expert = rank * epr + e;
    int row = 0;
    for (int s = 0; s < l.world_size; ++s) {
      const RankInput& in = inputs[s];
      for (int t = l.dp_member(s); t < in.num_tokens; t += l.dp_size) {
        const int32_t* idx = &in.indices[size_t(t) * K];
        if (std::find(idx, idx + K, expert) == idx + K) continue;
        const size_t dst = size_t(e) * l.max_rows_per_expert + row;
        out.expert_src_token[dst] = t;
        ++out.expert_num_tokens_per_rank[size_t(e) * l.world_size + s];
        if (in.quantize) {
          const QuantizedToken q = quantize_token(reinterpret_cast<const uint16_t*>(in.x.data()) + size_t(t) * l.hidden,
                                                  l.hidden, l.scale_block, in.round_scale);
          std::memcpy(&out.expert_x[dst * l.payload_bytes], q.q.data(), l.payload_bytes);
          std::memcpy(&out.expert_x_scale[dst * l.num_scales], q.scale.data(), l.scale_bytes);
        } else {
          std::memcpy(&out.expert_x[dst * l.payload_bytes], &in.x[size_t(t) * l.payload_bytes], l.payload_bytes);
          if (l.num_scales > 0)
            std::memcpy(&out.expert_x_scale[dst * l.num_scales], &in.x_scale[size_t(t) * l.num_scales],
                        l.scale_bytes);
        }
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
    QuantizedToken q;
    if (in.quantize)
      q = quantize_token(reinterpret_cast<const uint16_t*>(in.x.data()) + size_t(t) * l.hidden, l.hidden,
                         l.scale_block, in.round_scale);
    const void* x_row = in.quantize ? static_cast<const void*>(q.q.data()) : &in.x[size_t(t) * l.payload_bytes];
    const float* scale_row = in.quantize ? q.scale.data()
                             : l.num_scales > 0 ? &in.x_scale[size_t(t) * l.num_scales] : nullptr;
    for (int k = 0; k < K; ++k) {
      const int e = in.indices[size_t(t) * K + k];
      if (e < 0) continue;
      apply_expert(l, e, x_row, scale_row, y.data());
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

namespace {

// Byte offset of scale slot s of row r of local expert e, and the slots per row, in each
// ferry_scale_layout_t, as ferry.h states them.
struct ScaleLayout {
  int layout, num_scales, words, max_rows;
  int slots() const { return layout == 2 ? 4 * words : num_scales; }
  size_t offset(int e, int r, int s) const {
    switch (layout) {
      case 1: return ((size_t(e) * num_scales + size_t(s)) * size_t(max_rows) + size_t(r)) * 4;
      case 2: return ((size_t(e) * words + size_t(s / 4)) * size_t(max_rows) + size_t(r)) * 4 + size_t(s % 4);
      default: return ((size_t(e) * max_rows + size_t(r)) * num_scales + size_t(s)) * 4;
    }
  }
};

ScaleLayout scale_layout_of(const Layout& l, int scale_layout) {
  return {scale_layout, l.num_scales, (l.num_scales + 3) / 4, l.max_rows_per_expert};
}

// The UE8M0 byte of a nonnegative scale: its biased binary exponent (0 for 0).
uint8_t exponent_byte(float v) {
  if (v == 0.0f) return 0;
  int e = 0;
  std::frexp(v, &e);  // v = m * 2^e, m in [0.5, 1)
  return uint8_t(e - 1 + 127);
}

}  // namespace

std::string compare_dispatch(const ferry_a2a_config_t& c, const DispatchResult& want,
                             const int32_t* expert_num_tokens, const void* expert_x, const float* expert_x_scale,
                             int scale_layout) {
  const Layout l = make_layout(c);
  const ScaleLayout sl = scale_layout_of(l, scale_layout);
  const auto* scale_bytes = reinterpret_cast<const uint8_t*>(expert_x_scale);
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
      for (int s = 0; s < (l.num_scales > 0 ? sl.slots() : 0) && reported < 8; ++s) {
        const float w = s < l.num_scales ? want.expert_x_scale[row * l.num_scales + size_t(s)] : 0.0f;
        const uint8_t* g = scale_bytes + sl.offset(e, r, s);
        const bool same = scale_layout == 2 ? *g == exponent_byte(w) : std::memcmp(g, &w, 4) == 0;
        if (!same) {
          os << "rank " << l.rank << " local expert " << e << " row " << r << " scale " << s << ": ";
          if (scale_layout == 2) {
            os << "UE8M0 byte " << int(*g) << ", want " << int(exponent_byte(w)) << "\n";
          } else {
            float gv = 0.0f;
            std::memcpy(&gv, g, 4);
            os << std::setprecision(9) << gv << ", want " << w << "\n";
          }
          ++reported;
        }
      }
    }
  }
  return os.str();
}

std::string compare_sources(const ferry_a2a_config_t& c, const DispatchResult& want, const int32_t* src_token,
                            const int32_t* num_tokens_per_rank) {
  const Layout l = make_layout(c);
  std::ostringstream os;
  for (int e = 0; e < l.experts_per_rank; ++e) {
    for (int s = 0; s < l.world_size; ++s) {
      const size_t i = size_t(e) * l.world_size + s;
      if (num_tokens_per_rank[i] != want.expert_num_tokens_per_rank[i])
        os << "rank " << l.rank << " local expert " << e << ": " << num_tokens_per_rank[i] << " rows from rank " << s
           << ", want " << want.expert_num_tokens_per_rank[i] << "\n";
    }
    for (int r = 0; r < want.expert_num_tokens[e]; ++r) {
      const size_t row = size_t(e) * l.max_rows_per_expert + r;
      if (src_token[row] != want.expert_src_token[row]) {
        os << "rank " << l.rank << " local expert " << e << " row " << r << ": source token " << src_token[row]
           << ", want " << want.expert_src_token[row] << "\n";
        break;
      }
    }
  }
  return os.str();
}

std::vector<float> scales_as_rows(const ferry_a2a_config_t& c, int scale_layout, const void* expert_x_scale) {
  const Layout l = make_layout(c);
  const ScaleLayout sl = scale_layout_of(l, scale_layout);
  const auto* bytes = static_cast<const uint8_t*>(expert_x_scale);
  std::vector<float> rows(size_t(l.experts_per_rank) * l.max_rows_per_expert * l.num_scales);
  for (int e = 0; e < l.experts_per_rank; ++e)
    for (int r = 0; r < l.max_rows_per_expert; ++r)
      for (int s = 0; s < l.num_scales; ++s) {
        float& v = rows[(size_t(e) * l.max_rows_per_expert + r) * l.num_scales + size_t(s)];
        const uint8_t* at = bytes + sl.offset(e, r, s);
        if (scale_layout == 2) v = std::ldexp(1.0f, int(*at) - 127);
        else std::memcpy(&v, at, 4);
      }
  return rows;
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
