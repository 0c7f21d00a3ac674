// 32-bit immediates. EFA delivers 4 bytes of remote CQ data, and tcp;ofi_rxm reports the source of a
// remote write as FI_ADDR_NOTAVAIL, so every immediate carries its sender's rank in the low bits.
#pragma once
#include <cstdint>

namespace ferry::te::imm {

constexpr int kRankBits = 12;  // up to 4096 ranks
constexpr uint32_t kMaxRanks = 1u << kRankBits;
constexpr int kTagBits = 32 - kRankBits;
constexpr uint32_t kMaxTag = (1u << kTagBits) - 1;

constexpr uint32_t encode(uint32_t tag, uint32_t sender_rank) {
  return (tag << kRankBits) | (sender_rank & (kMaxRanks - 1));
}
constexpr uint32_t tag(uint32_t value) { return value >> kRankBits; }
constexpr uint32_t sender(uint32_t value) { return value & (kMaxRanks - 1); }

// Tags below kUserTagBase are reserved for the engine (barriers, liveness).
constexpr uint32_t kUserTagBase = 16;

}  // namespace ferry::te::imm
