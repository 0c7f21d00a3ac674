// Which ranks form a tensor-parallel group and which a pipeline-parallel group, in the order
// Megatron-LM and vLLM lay out a job: world = pp * dp * tp, rank = (stage * dp + replica) * tp + t.
//   TP group: tp consecutive ranks (the ranks of one node's NVLink domain in a usual launch)
//   PP group: the pp ranks at the same position of each stage, stride world / pp
// Pure arithmetic, shared by the NCCL communicators and their tests.
#pragma once
#include <string>
#include <vector>

namespace ferry::nccl {

struct ParallelLayout {
  int world_size = 1;
  int tp_size = 1;
  int pp_size = 1;
};

// Empty when valid; otherwise a message naming the field (tp and pp at least 1, tp * pp dividing
// the world size).
std::string check_layout(const ParallelLayout& layout);

struct Group {
  int id = 0;              // which group of its kind, 0 .. world / size - 1
  std::vector<int> ranks;  // in communicator order
  int index = 0;           // this rank's position in `ranks` (its NCCL rank)
  int leader() const { return ranks.front(); }
};

Group tp_group(const ParallelLayout& layout, int rank);
Group pp_group(const ParallelLayout& layout, int rank);

}  // namespace ferry::nccl
