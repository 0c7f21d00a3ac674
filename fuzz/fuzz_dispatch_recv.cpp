// The host backend's whole receive path over bytes peers wrote: each sender's count header
// (check_count_header, as the Protocol reads them), the receive plan from the count matrix, then
// host::unpack_dispatch reading every record into outputs of exactly the documented size. Whatever
// the bytes, it either refuses them (ferry::Error) or writes only inside its outputs (ASan watches).
//   input: world-1, experts_per_rank-1, top_k-1, max_tokens-1, rank, options, private_tokens,
//   then the receive region's bytes (zero-padded)
#include <cstdint>
#include <cstring>
#include <vector>

#include "csrc/backend.h"
#include "csrc/host/pack.h"
#include "csrc/plan.h"
#include "fuzz/layout_from_bytes.h"
#include "transfer_engine/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ferry::ep;
  constexpr size_t kParams = 7;
  if (size < kParams) return 0;
  ferry_a2a_config_t c = ferry::fuzz::config_from(data, 8, 8, 16);
  c.rank = data[4] % c.world_size;
  const uint8_t options = data[5];
  c.hidden_dim = 16;
  if (options & 1) {  // fp8 rows with block scales
    c.in_dtype = FERRY_FP8_E4M3;
    c.scale_block = 8;
  }
  c.expert_alignment = 1 + (options >> 1) % 4;
  c.private_tokens = data[6] % (c.max_tokens_per_rank + 1);
  const Layout l = make_layout(c);
  const int R = l.world_size, E = l.experts_per_rank;

  std::vector<uint8_t> recv(l.recv_buffer_bytes(), 0);
  std::memcpy(recv.data(), data + kParams, size - kParams < recv.size() ? size - kParams : recv.size());

  std::vector<int32_t> matrix(size_t(R) * R), expert_counts(size_t(R) * E);
  for (int s = 0; s < R; ++s)
    if (!check_count_header(l, recv.data() + l.recv_private_offset(s), &matrix[size_t(s) * R],
                            &expert_counts[size_t(s) * E])
             .empty())
      return 0;
  const RecvPlan plan = make_recv_plan(l, matrix.data(), expert_counts.data());

  const size_t rows = size_t(E) * l.max_rows_per_expert;
  std::vector<int32_t> out_counts(E);
  std::vector<uint8_t> out_x(rows * l.payload_bytes);
  std::vector<float> out_scale(rows * l.num_scales);
  host::ReceivedRoutes routes;
  try {
    host::unpack_dispatch(l, plan, recv.data(), out_counts.data(), out_x.data(),
                          l.num_scales ? out_scale.data() : nullptr, routes);
  } catch (const ferry::Error&) {
    return 0;  // a peer's bad record, refused with its reason
  }
  return 0;
}
