// The order in which one layer step calls Ferry's halves and the grouped GEMM, per micro-batch.
//
//   plain:  DS0 DR0 G0 CS0 CR0                        one batch; nothing overlaps the transfers
//   tbo:    DS0 DR0 DS1 G0 DR1 CS0 G1 CR0 CS1 CR1     two micro-batches (vLLM's dual-batch overlap,
//           SGLang's two-batch overlap): batch 1's dispatch is in flight during batch 0's GEMM,
//           batch 0's combine during batch 1's GEMM
// (DS/DR: dispatch SEND/RECV, G: grouped GEMM, CS/CR: combine SEND/RECV, digit: micro-batch). In a
// whole model the two transfers left exposed here (DS0-DR0, CS1-CR1) overlap the attention of the
// other micro-batch in the neighbouring layers; one layer alone cannot hide them.
#pragma once
#include <string>
#include <vector>

namespace ferry::moe {

enum class OpKind { dispatch_send, dispatch_recv, gemm, combine_send, combine_recv };

struct Op {
  OpKind kind;
  int batch;  // micro-batch
};

using Schedule = std::vector<Op>;

enum class ScheduleKind { plain, tbo };
const char* schedule_name(ScheduleKind kind);  // "plain", "tbo"

Schedule make_schedule(ScheduleKind kind);
// Micro-batches a schedule uses: 1 + its largest batch index.
int num_micro_batches(const Schedule& schedule);
// The same order without the GEMMs (the transfers alone), and the GEMMs alone.
Schedule transfers_of(const Schedule& schedule);
Schedule gemms_of(const Schedule& schedule);

// "dispatch RECV of micro-batch 1"
std::string describe(const Op& op);
// "DS0 DR0 G0 CS0 CR0"
std::string describe(const Schedule& schedule);

}  // namespace ferry::moe
