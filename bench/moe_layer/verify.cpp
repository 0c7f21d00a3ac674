#include "bench/moe_layer/verify.h"

#include <cstdint>
#include <vector>

#include "csrc/plan.h"

namespace ferry::moe {

// Every token of this rank's output against the dense reference, and the rows each local expert
// received against the reference router: empty when all match.
std::string verify_schedule(MoeLayer& layer, const LayerShape& s, const ReferenceOutput& want, int rank, ScheduleKind kind) {
  const Schedule schedule = make_schedule(kind);
  layer.run(schedule);
  const int n = num_micro_batches(schedule);
  std::string failure;
  for (int b = 0; b < n; ++b) {
    const std::vector<int32_t> counts = reference_expert_counts(s, rank, n, b);
    if (counts != layer.expert_counts(b)) {
      failure += "rank " + std::to_string(rank) + " " + schedule_name(kind) + " micro-batch " + std::to_string(b) +
                 ": local experts received rows";
      for (int32_t c : layer.expert_counts(b)) failure += " " + std::to_string(c);
      failure += ", the reference router sends";
      for (int32_t c : counts) failure += " " + std::to_string(c);
      failure += "\n";
    }
  }
  std::vector<uint8_t> out(size_t(s.tokens) * s.hidden * ep::elem_bytes_of(s.out_dtype));
  layer.download_output(out.data());
  return failure + compare_output(s, want, rank, 0, out.data(), s.tokens);
}

}  // namespace ferry::moe
