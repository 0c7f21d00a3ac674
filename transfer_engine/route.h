// How one write is cut across NICs: pure arithmetic, shared by the sender (which posts the pieces)
// and pieces_for() (which tells the receiver how many arrivals to expect).
#pragma once
#include <algorithm>
#include <cstdint>

#include "transfer_engine/engine.h"

namespace ferry::te::route {

struct Piece {
  uint64_t offset = 0;  // within the write
  uint64_t bytes = 0;
  int nic = 0;
};

// automatic becomes by_bytes at or above split_threshold_bytes (when there is more than one NIC).
constexpr NicRoute resolve(NicRoute route, uint64_t bytes, int num_nics,
                           uint64_t split_threshold_bytes) {
  if (num_nics <= 1) return NicRoute::by_peer;
  if (route == NicRoute::automatic)
    return bytes >= split_threshold_bytes ? NicRoute::by_bytes : NicRoute::by_peer;
  return route;
}

// One piece per NIC, but no piece smaller than min_split_bytes (and always at least one piece, so
// a zero-byte write still carries its immediate).
constexpr uint32_t piece_count(NicRoute resolved, uint64_t bytes, int num_nics,
                               uint64_t min_split_bytes) {
  if (resolved != NicRoute::by_bytes || num_nics <= 1) return 1;
  const uint64_t by_size = min_split_bytes == 0 ? bytes : bytes / min_split_bytes;
  return static_cast<uint32_t>(std::clamp<uint64_t>(by_size, 1, static_cast<uint64_t>(num_nics)));
}

// Piece `index` of `count`: near-equal contiguous ranges. Pieces of one write start on different
// NICs for different peers so that small splits still spread over every NIC.
constexpr Piece piece(uint64_t bytes, uint32_t index, uint32_t count, size_t peer_index,
                      int num_nics, NicRoute resolved) {
  Piece p;
  const unsigned __int128 total = bytes;
  const uint64_t begin = static_cast<uint64_t>(total * index / count);
  const uint64_t end = static_cast<uint64_t>(total * (index + 1) / count);
  p.offset = begin;
  p.bytes = end - begin;
  p.nic = static_cast<int>((peer_index + (resolved == NicRoute::by_bytes ? index : 0)) %
                           static_cast<size_t>(std::max(num_nics, 1)));
  return p;
}

}  // namespace ferry::te::route
