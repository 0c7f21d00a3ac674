// What peers tell the engine through the bootstrap: at setup, their endpoint addresses (one blob
// per rank), later the descriptors of their registered regions. Everything here is a pure
// function over received bytes, checked field by field before anything is used, so a peer (or
// whatever reached the bootstrap in its place) can neither make the engine read past a buffer nor
// hand it a descriptor that is not what it claims. Fuzzed in fuzz/fuzz_engine_setup.cpp and
// fuzz/fuzz_region_desc.cpp.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "transfer_engine/engine.h"

namespace ferry::te::peer_info {

// Per NIC in the setup blob: address length (uint32) + address bytes (EFA 32, tcp 16 or 28, shm < 64).
constexpr size_t kAddressSlotBytes = 256;
constexpr size_t kMaxAddressBytes = kAddressSlotBytes - sizeof(uint32_t);
constexpr size_t kProviderNameBytes = 56;

struct SetupHeader {
  uint32_t num_nics = 0;
  uint32_t virt_addr = 0;
  char provider[kProviderNameBytes] = {};
};
constexpr size_t kSetupBlobBytes = sizeof(SetupHeader) + kMaxNics * kAddressSlotBytes;

// This rank's side of the setup exchange.
struct LocalSetup {
  std::string provider;  // as libfabric names it, e.g. "tcp;ofi_rxm"
  bool virt_addr = false;
  std::vector<std::vector<uint8_t>> addresses;  // one per NIC
};

// The blob this rank contributes (kSetupBlobBytes). Throws Status::unsupported when an address or
// the provider name does not fit, or there are no or too many NICs.
std::vector<uint8_t> encode_setup(const LocalSetup& mine, int my_rank);

// Every rank's blob, rank-major, as the allgather returned it. Checks each rank's header against
// this rank's (same provider, NIC count and addressing mode) and each address length against its
// slot, and returns addresses[nic][rank]. Throws Status::invalid_argument naming the rank and the
// field that is wrong.
std::vector<std::vector<std::vector<uint8_t>>> parse_setups(std::span<const uint8_t> all,
                                                            int world_size, const LocalSetup& mine,
                                                            int my_rank);

// Checks the descriptors exchange() returned: entry r must come from rank r, carry one key per NIC
// of this engine, a size of at least one byte, and under offset addressing a base of 0 (under
// FI_MR_VIRT_ADDR a range that does not wrap). Throws Status::invalid_argument naming the rank.
void check_region_descs(std::span<const RegionDesc> descs, uint32_t num_nics, bool virt_addr,
                        int my_rank);

// One descriptor a caller hands to make_group for `peer`.
void check_region_desc(const RegionDesc& desc, int peer, uint32_t num_nics, bool virt_addr,
                       int my_rank, const char* what);

}  // namespace ferry::te::peer_info
