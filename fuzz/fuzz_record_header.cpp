// A record header as the unpacker reads it from a peer (check_record_header, shared with the CUDA
// kernels), on a layout drawn from the input: what it accepts names a source token this rank can
// hold, and routes to distinct local experts of this rank.
//   input: world-1, experts_per_rank-1, top_k-1, max_tokens-1, sender, prev_src_token+1, then 64
//   bytes of RecordHeader
#include <cstdint>
#include <cstring>

#include "csrc/backend.h"
#include "csrc/plan.h"
#include "fuzz/layout_from_bytes.h"

namespace {

[[noreturn]] void fail(const char* what) { ferry::fuzz::broken("fuzz_record_header", what); }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ferry::ep;
  if (size < 6) return 0;
  const ferry_a2a_config_t c = ferry::fuzz::config_from(data, 16, 64, 256);
  const Layout l = make_layout(c);
  const int sender = data[4] % c.world_size;
  const int prev = int(data[5]) - 1;
  RecordHeader h;
  std::memset(&h, 0, sizeof h);
  std::memcpy(&h, data + 6, size - 6 < sizeof h ? size - 6 : sizeof h);

  if (check_record_header(l, h, sender, prev) != nullptr) return 0;
  if (h.src_rank != sender) fail("accepted a record of another sender");
  if (h.src_token < 0 || h.src_token >= l.max_tokens || h.src_token <= prev) fail("accepted a bad source token");
  if (h.num_routes < 1 || h.num_routes > kMaxTopK || h.num_routes > l.max_routes_per_record())
    fail("accepted a bad route count");
  bool seen[64] = {};  // experts_per_rank <= 64 here
  for (int i = 0; i < h.num_routes; ++i) {
    const int e = h.local_expert[i];
    if (e < 0 || e >= l.experts_per_rank) fail("accepted a local expert out of range");
    if (seen[e]) fail("accepted a repeated local expert");
    seen[e] = true;
  }
  return 0;
}
