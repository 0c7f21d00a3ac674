// Sizes an EP64 decode step through the installed library: no peers, no network.
#include <ferry/ferry.h>

#include <cstdio>

int main() {
  ferry_a2a_config_t config;
  ferry_a2a_config_init(&config);
  config.world_size = 64;
  config.num_experts = 256;
  config.experts_per_token = 8;
  config.max_tokens_per_rank = 128;
  config.hidden_dim = 7168;
  config.in_dtype = FERRY_FP8_E4M3;
  config.scale_block = 128;
  ferry_buffer_sizes_t sizes;
  if (ferry_a2a_buffer_sizes(&config, &sizes) != FERRY_OK) {
    std::fprintf(stderr, "ferry_a2a_buffer_sizes: %s\n", ferry_last_error());
    return 1;
  }
  std::printf("record %llu bytes, receive buffer %llu bytes\n",
              static_cast<unsigned long long>(sizes.record_bytes),
              static_cast<unsigned long long>(sizes.recv_bytes));
  return sizes.recv_bytes > 0 ? 0 : 1;
}
