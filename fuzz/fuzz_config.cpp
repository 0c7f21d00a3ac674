// Config validation through the public entry point: any bit pattern in the integer and enum fields
// of ferry_a2a_config_t either fails with a status and a message, or yields buffer sizes that are
// consistent and did not wrap around (recomputed here in 128-bit arithmetic).
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>

#include "ferry/ferry.h"

namespace {

struct Reader {
  const uint8_t* data;
  size_t size;
  int32_t next() {
    int32_t v = 0;
    const size_t n = size < sizeof(v) ? size : sizeof(v);
    std::memcpy(&v, data, n);
    data += n;
    size -= n;
    return v;
  }
};

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_config: %s\n", what);
  std::abort();
}

unsigned __int128 align16(unsigned __int128 v) { return (v + 15) / 16 * 16; }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader in{data, size};
  ferry_a2a_config_t c;
  ferry_a2a_config_init(&c);
  c.rank = in.next();
  c.world_size = in.next();
  c.num_experts = in.next();
  c.experts_per_token = in.next();
  c.max_tokens_per_rank = in.next();
  c.hidden_dim = in.next();
  // Enum fields get whatever a C caller can store in them.
  const int32_t in_dtype = in.next(), out_dtype = in.next(), device = in.next();
  std::memcpy(&c.in_dtype, &in_dtype, sizeof(in_dtype));
  std::memcpy(&c.out_dtype, &out_dtype, sizeof(out_dtype));
  std::memcpy(&c.device, &device, sizeof(device));
  c.scale_block = in.next();
  c.expert_alignment = in.next();
  c.cuda_device = in.next();
  c.nets_per_rank = in.next();
  c.timeout_ms = in.next();
  c.dp_size = in.next();
  c.private_tokens = in.next();
  const int32_t combine_weights = in.next();
  std::memcpy(&c.combine_weights, &combine_weights, sizeof(combine_weights));

  ferry_buffer_sizes_t s;
  std::memset(&s, 0xab, sizeof(s));
  const ferry_status_t status = ferry_a2a_buffer_sizes(&c, &s);
  if (status != FERRY_OK) {
    if (ferry_last_error()[0] == '\0') fail("an error without a message");
    return 0;
  }
  if (ferry_last_error()[0] != '\0') fail("success leaves a stale error message");

  // Accepted: the sizes must follow from the config without wrapping around.
  const int elem_in = c.in_dtype == FERRY_F32 ? 4 : c.in_dtype == FERRY_FP8_E4M3 ? 1 : 2;
  const int elem_out = c.out_dtype == FERRY_F32 ? 4 : 2;
  using u128 = unsigned __int128;
  const u128 scales = c.scale_block > 0 ? u128(c.hidden_dim / c.scale_block) * 4 : 0;
  const u128 record = align16(64 + u128(c.hidden_dim) * elem_in + scales);
  const u128 partial = align16(u128(c.hidden_dim) * elem_out);
  const int topk_dests = c.experts_per_token < c.world_size ? c.experts_per_token : c.world_size;
  const u128 max_send = u128(c.max_tokens_per_rank) * topk_dests;
  const u128 max_recv = u128(c.world_size) * c.max_tokens_per_rank;
  const u128 header = align16(4 * (u128(c.world_size) + c.num_experts / c.world_size));
  const u128 send = c.world_size * header + max_send * record;
  // With weights at combine a record's combine slot holds a row per route it can carry.
  const int experts_per_rank = c.num_experts / c.world_size;
  const u128 slot = combine_weights == FERRY_WEIGHTS_AT_COMBINE
                        ? partial * u128(c.experts_per_token < experts_per_rank ? c.experts_per_token : experts_per_rank)
                        : partial;
  const u128 combine_send = max_recv * slot, combine_recv = max_send * slot;
  if (s.record_bytes != record) fail("record_bytes differs from the layout");
  if (s.send_bytes != send) fail("send_bytes wrapped or differs from the layout");
  if (s.combine_send_bytes != combine_send) fail("combine_send_bytes wrapped");
  if (s.combine_recv_bytes != combine_recv) fail("combine_recv_bytes wrapped");
  if (u128(s.recv_bytes) < max_recv * record) fail("recv_bytes smaller than world_size * max_tokens records");
  const u128 total = u128(s.send_bytes) + s.recv_bytes + s.combine_send_bytes + s.combine_recv_bytes;
  if (s.total_registered_bytes != total) fail("total_registered_bytes is not the sum of the buffers");
  if (s.num_local_experts != c.num_experts / c.world_size) fail("num_local_experts");
  if (s.max_rows_per_expert < int64_t(c.world_size) * c.max_tokens_per_rank) fail("max_rows_per_expert too small");
  return 0;
}
