#include "bench/moe_layer/model.h"

#include <cmath>

#include "csrc/dtype.h"

namespace ferry::moe {

namespace {

uint64_t mix(uint64_t z) {
  // splitmix64's finaliser: every input bit reaches every output bit.
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t draw(uint64_t seed, uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  return mix(mix(mix(mix(seed ^ a) ^ b) ^ c) ^ d);
}

// An integer in [-limit, limit].
int grid(uint64_t h, int limit) { return int(h % uint64_t(2 * limit + 1)) - limit; }

// 2^-round(log2(sqrt(n))): keeps a sum of n products near the magnitude of its terms, and keeps the
// values on the bf16 grid.
float fan_in_scale(int n) { return std::ldexp(1.0f, -int(std::lround(0.5 * std::log2(double(n))))); }

}  // namespace

std::string check_shape(const LayerShape& s) {
  auto need = [](bool ok, const std::string& what) { return ok ? std::string() : what; };
  std::string e;
  if (!(e = need(s.world_size >= 1, "world size must be at least 1")).empty()) return e;
  if (!(e = need(s.tp_size >= 1 && s.tp_size <= kMaxTpSize,
                 "--tp must be in [1, " + std::to_string(kMaxTpSize) + "] (sums of the partials stay exact in bf16), got " +
                     std::to_string(s.tp_size))).empty())
    return e;
  if (!(e = need(s.world_size % s.tp_size == 0, "--tp " + std::to_string(s.tp_size) + " must divide the world size " +
                                                    std::to_string(s.world_size))).empty())
    return e;
  if (!(e = need(s.num_experts >= s.world_size && s.num_experts % s.world_size == 0,
                 "--experts " + std::to_string(s.num_experts) + " must be a positive multiple of the world size " +
                     std::to_string(s.world_size))).empty())
    return e;
  if (!(e = need(s.top_k >= 1 && s.top_k <= 8 && s.top_k <= s.num_experts,
                 "--topk must be in [1, min(8, experts)], got " + std::to_string(s.top_k))).empty())
    return e;
  if (!(e = need(s.hidden >= 1, "--hidden must be at least 1")).empty()) return e;
  if (!(e = need(s.intermediate >= 1, "--intermediate must be at least 1")).empty()) return e;
  if (!(e = need(s.tokens >= 1, "--tokens must be at least 1")).empty()) return e;
  return need(s.out_dtype == FERRY_BF16 || s.out_dtype == FERRY_F32, "--out-dtype must be bf16 or f32");
}

float weight(const LayerShape& s, Matrix m, int expert, int row, int col) {
  const int k = grid(draw(s.seed, uint64_t(m) + 1, uint64_t(m == Matrix::router ? 0 : expert + 1), uint64_t(row),
                          uint64_t(col)),
                     64);
  const int fan_in = m == Matrix::down ? s.intermediate : s.hidden;
  return float(k) / 64.0f * fan_in_scale(fan_in);
}

std::vector<float> router_weights(const LayerShape& s) {
  std::vector<float> w(size_t(s.hidden) * s.num_experts);
  for (int h = 0; h < s.hidden; ++h)
    for (int e = 0; e < s.num_experts; ++e) w[size_t(h) * s.num_experts + e] = weight(s, Matrix::router, 0, h, e);
  return w;
}

void expert_weights(const LayerShape& s, int expert, float* gate_up, float* down) {
  const int I = s.intermediate;
  for (int h = 0; h < s.hidden; ++h) {
    for (int j = 0; j < I; ++j) {
      gate_up[size_t(h) * 2 * I + j] = weight(s, Matrix::gate, expert, h, j);
      gate_up[size_t(h) * 2 * I + I + j] = weight(s, Matrix::up, expert, h, j);
    }
  }
  for (int j = 0; j < I; ++j)
    for (int h = 0; h < s.hidden; ++h) down[size_t(j) * s.hidden + h] = weight(s, Matrix::down, expert, j, h);
}

std::vector<uint16_t> attention_partial(const LayerShape& s, int group, int member) {
  std::vector<uint16_t> x(size_t(s.tokens) * s.hidden);
  for (int t = 0; t < s.tokens; ++t) {
    for (int h = 0; h < s.hidden; ++h) {
      const int k = grid(draw(s.seed, 0x100 + uint64_t(group), uint64_t(member), uint64_t(t), uint64_t(h)), 32);
      x[size_t(t) * s.hidden + h] = ep::dtype::f32_to_bf16(float(k) / 64.0f);
    }
  }
  return x;
}

std::vector<uint16_t> hidden_states(const LayerShape& s, int group) {
  std::vector<double> sum(size_t(s.tokens) * s.hidden, 0.0);
  for (int m = 0; m < s.tp_size; ++m) {
    const auto p = attention_partial(s, group, m);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += ep::dtype::bf16_to_f32(p[i]);
  }
  std::vector<uint16_t> x(sum.size());
  for (size_t i = 0; i < sum.size(); ++i) x[i] = ep::dtype::f32_to_bf16(float(sum[i]));
  return x;
}

ferry_a2a_config_t a2a_config(const LayerShape& s, int rank, int max_tokens) {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.rank = rank;
  c.world_size = s.world_size;
  c.num_experts = s.num_experts;
  c.experts_per_token = s.top_k;
  c.max_tokens_per_rank = max_tokens;
  c.hidden_dim = s.hidden;
  c.in_dtype = FERRY_BF16;
  c.scale_block = 0;
  c.out_dtype = s.out_dtype;
  c.dp_size = s.tp_size;
  return c;
}

TokenRange micro_batch_range(int tokens, int num_micro_batches, int b) {
  const int base = tokens / num_micro_batches, extra = tokens % num_micro_batches;
  TokenRange r;
  r.begin = b * base + (b < extra ? b : extra);
  r.end = r.begin + base + (b < extra ? 1 : 0);
  return r;
}

}  // namespace ferry::moe
