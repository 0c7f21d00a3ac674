// Launch shapes and limits of the CUDA backend's kernels, in one place.
#pragma once
#include <cstdint>

#include "ferry/ferry.h"

namespace ferry::cuda {

constexpr int kWarpSize = 32;
// Routing kernels run in one block so that their prefix sums need no grid-wide synchronisation.
constexpr int kRouteThreads = 1024;
constexpr int kRouteWarps = kRouteThreads / kWarpSize;
// Copy kernels: one warp per token or record, a persistent grid of kCopyBlocksPerSm blocks per SM
// (the device-side token count decides how much each warp does, so the grid is fixed at capture).
constexpr int kCopyThreads = 256;
constexpr int kCopyWarps = kCopyThreads / kWarpSize;
constexpr int kCopyBlocksPerSm = 8;
// Blocks of a copy kernel: enough to fill the GPU, never more than there can be items (tokens or
// received records) in a step, so small steps do not pay for idle blocks.
inline int copy_grid(int num_sms, uint64_t max_items) {
  const uint64_t full = uint64_t(num_sms) * kCopyBlocksPerSm;
  return int(max_items < 1 ? 1 : (max_items < full ? max_items : full));
}
// 16-byte vectors each lane keeps in flight before storing them: hides load latency on long rows.
constexpr int kCopyUnroll = 4;
// Tokens (or received records) ranked together by one warp with ballot-style bitmasks.
constexpr int kChunk = 32;
// Shared memory a routing block may use (H100: 227 KiB per block after opting in).
constexpr int kRouteSmemBytes = 160 * 1024;
// A receive kernel run without a config's deadline (single-process kernel checks and benchmarks)
// gives up waiting for its arrival flag after the library's default.
constexpr uint64_t kDefaultWaitTimeoutNs = uint64_t(FERRY_DEFAULT_TIMEOUT_MS) * 1000 * 1000;

}  // namespace ferry::cuda
