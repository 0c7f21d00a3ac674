// A count header as a receiver reads it from a peer (check_count_header), on a layout drawn from
// the input: any bytes are either refused with a reason or give counts from which the receive plan
// places every record inside the receive region and every row inside the expert-major output.
//   input: world-1, experts_per_rank-1, top_k-1, max_tokens-1, rank, then the header's bytes
#include <cstdint>
#include <cstring>
#include <vector>

#include "csrc/backend.h"
#include "csrc/plan.h"
#include "fuzz/layout_from_bytes.h"

namespace {

[[noreturn]] void fail(const char* what) { ferry::fuzz::broken("fuzz_count_header", what); }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ferry::ep;
  if (size < 5) return 0;
  ferry_a2a_config_t c = ferry::fuzz::config_from(data, 64, 64, 256);
  c.rank = data[4] % c.world_size;
  const Layout l = make_layout(c);
  std::vector<uint8_t> header(l.count_header_bytes, 0);
  std::memcpy(header.data(), data + 5, size - 5 < header.size() ? size - 5 : header.size());

  std::vector<int32_t> counts(l.world_size), experts(l.experts_per_rank);
  if (!check_count_header(l, header.data(), counts.data(), experts.data()).empty()) return 0;

  // Accepted: every sender sends this header; the plan built from it stays inside every buffer.
  const int R = l.world_size;
  std::vector<int32_t> matrix(size_t(R) * R), expert_counts(size_t(R) * l.experts_per_rank);
  for (int s = 0; s < R; ++s) {
    std::memcpy(&matrix[size_t(s) * R], counts.data(), sizeof(int32_t) * R);
    std::memcpy(&expert_counts[size_t(s) * l.experts_per_rank], experts.data(), sizeof(int32_t) * l.experts_per_rank);
  }
  const RecvPlan plan = make_recv_plan(l, matrix.data(), expert_counts.data());
  if (uint64_t(plan.total_records) > l.max_recv_records()) fail("more records than the receive region holds");
  for (int s = 0; s < R; ++s)
    for (int64_t p = 0; p < plan.count[s]; ++p)
      if (l.recv_record_offset(s, p, plan.overflow_before[s]) + l.record_bytes > l.recv_buffer_bytes())
        fail("a record lies past the receive region");
  for (int e = 0; e < l.experts_per_rank; ++e)
    if (plan.expert_padded[e] > l.max_rows_per_expert) fail("an expert's rows pass its capacity");
  return 0;
}
