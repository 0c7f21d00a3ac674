// What the fuzz targets of csrc share: a small valid config drawn from the input's first four bytes
// (so every input reaches the parser under test), and how a target reports a broken property.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "ferry/ferry.h"

namespace ferry::fuzz {

// bytes[0..3]: world_size - 1, experts per rank - 1, top-k - 1, max_tokens_per_rank - 1, each
// reduced to the given bounds; hidden_dim 8 of bf16 (one 16-byte row).
inline ferry_a2a_config_t config_from(const uint8_t* bytes, int max_world, int max_experts_per_rank, int max_tokens) {
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.world_size = bytes[0] % max_world + 1;
  c.num_experts = c.world_size * (bytes[1] % max_experts_per_rank + 1);
  c.experts_per_token = bytes[2] % FERRY_MAX_TOP_K + 1 < c.num_experts ? bytes[2] % FERRY_MAX_TOP_K + 1 : c.num_experts;
  c.max_tokens_per_rank = bytes[3] % max_tokens + 1;
  c.hidden_dim = 8;
  return c;
}

[[noreturn]] inline void broken(const char* target, const char* property) {
  std::fprintf(stderr, "%s: %s\n", target, property);
  std::abort();
}

}  // namespace ferry::fuzz
