// The SwiGLU between the two grouped GEMMs on CUDA: a = bf16(silu(g) * u) for the rows each local
// expert received, with the rounding of csrc/dtype.h (the host path's).
#pragma once
#include <cstdint>

namespace ferry::moe {

// gate_up: [experts * max_rows][2 * intermediate] bf16 (gate columns, then up columns);
// act: [experts * max_rows][intermediate] bf16; counts: [experts] int32 in device memory.
void launch_swiglu(const void* gate_up, void* act, const int32_t* counts, int experts, int max_rows, int intermediate,
                   void* stream);

}  // namespace ferry::moe
