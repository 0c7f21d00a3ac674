// Moves one step's bytes between ranks simulated in one process on one GPU, with stream-ordered
// copies placed exactly where the Protocol's writes land: the kernels' checks and benchmark run on
// it without a network. count_matrix[s * world_size + d] is the records s sends d this step.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "csrc/plan.h"

namespace ferry::cuda {

// Sender s's section for d (count header, then its records: private part and overflow part) from
// s's send buffer into d's receive buffer.
void loopback_dispatch(const ep::Layout& layout, const int32_t* count_matrix, int sender, int dest,
                       const uint8_t* send_buf, uint8_t* recv_buf, cudaStream_t stream);

// The partials (or rows, with weights at combine) d computed for the records s sent it (receive
// order on d) into s's combine region, at the slots those records had in s's send buffer (dp_size 1).
void loopback_combine(const ep::Layout& layout, const int32_t* count_matrix, int sender, int dest,
                      const uint8_t* dest_partials, uint8_t* sender_combine_recv, cudaStream_t stream);

}  // namespace ferry::cuda
