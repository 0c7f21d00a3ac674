#include "transfer_engine/peer_info.h"

#include <cstring>

#include "transfer_engine/error.h"

namespace ferry::te::peer_info {
namespace {

std::string who(int rank) { return "rank " + std::to_string(rank); }

// A provider name from the wire, printable whatever the peer sent.
std::string printable(const char* name, size_t max_bytes) {
  std::string out(name, strnlen(name, max_bytes));
  for (char& c : out) {
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) > 0x7e) c = '?';
  }
  return out;
}

}  // namespace

std::vector<uint8_t> encode_setup(const LocalSetup& mine, int my_rank) {
  if (mine.addresses.empty() || mine.addresses.size() > static_cast<size_t>(kMaxNics)) {
    raise(Status::unsupported, who(my_rank) + ": " + std::to_string(mine.addresses.size()) +
                                   " NICs; the setup exchange carries 1 to " +
                                   std::to_string(kMaxNics));
  }
  if (mine.provider.size() >= kProviderNameBytes) {
    raise(Status::unsupported, who(my_rank) + ": provider name '" + mine.provider +
                                   "' is longer than " + std::to_string(kProviderNameBytes - 1) +
                                   " bytes");
  }
  std::vector<uint8_t> blob(kSetupBlobBytes, 0);
  SetupHeader header;
  header.num_nics = static_cast<uint32_t>(mine.addresses.size());
  header.virt_addr = mine.virt_addr ? 1 : 0;
  std::memcpy(header.provider, mine.provider.data(), mine.provider.size());
  std::memcpy(blob.data(), &header, sizeof(header));
  for (size_t n = 0; n < mine.addresses.size(); ++n) {
    const auto& address = mine.addresses[n];
    if (address.empty() || address.size() > kMaxAddressBytes) {
      raise(Status::unsupported, who(my_rank) + ": endpoint address of NIC " + std::to_string(n) +
                                     " is " + std::to_string(address.size()) +
                                     " bytes; the setup exchange carries 1 to " +
                                     std::to_string(kMaxAddressBytes));
    }
    uint8_t* slot = blob.data() + sizeof(SetupHeader) + n * kAddressSlotBytes;
    const uint32_t length = static_cast<uint32_t>(address.size());
    std::memcpy(slot, &length, sizeof(length));
    std::memcpy(slot + sizeof(length), address.data(), address.size());
  }
  return blob;
}

std::vector<std::vector<std::vector<uint8_t>>> parse_setups(std::span<const uint8_t> all,
                                                            int world_size, const LocalSetup& mine,
                                                            int my_rank) {
  if (world_size < 1 || all.size() / kSetupBlobBytes != static_cast<size_t>(world_size) ||
      all.size() % kSetupBlobBytes != 0) {
    raise(Status::internal, who(my_rank) + ": setup exchange returned " +
                                std::to_string(all.size()) + " bytes for " +
                                std::to_string(world_size) + " ranks of " +
                                std::to_string(kSetupBlobBytes));
  }
  const size_t nics = mine.addresses.size();
  std::vector<std::vector<std::vector<uint8_t>>> addresses(
      nics, std::vector<std::vector<uint8_t>>(static_cast<size_t>(world_size)));
  for (int r = 0; r < world_size; ++r) {
    const uint8_t* blob = all.data() + kSetupBlobBytes * static_cast<size_t>(r);
    SetupHeader theirs;
    std::memcpy(&theirs, blob, sizeof(theirs));
    const size_t name_bytes = strnlen(theirs.provider, kProviderNameBytes);
    if (name_bytes == kProviderNameBytes) {
      raise(Status::invalid_argument,
            who(my_rank) + ": rank " + std::to_string(r) +
                "'s setup names a provider that is not terminated within its " +
                std::to_string(kProviderNameBytes) + "-byte field");
    }
    if (theirs.num_nics != nics || theirs.virt_addr != (mine.virt_addr ? 1u : 0u) ||
        std::string(theirs.provider, name_bytes) != mine.provider) {
      raise(Status::invalid_argument,
            who(my_rank) + ": rank " + std::to_string(r) + " opened " +
                std::to_string(theirs.num_nics) + " NICs of provider " +
                printable(theirs.provider, kProviderNameBytes) +
                (theirs.virt_addr > 1 ? " (addressing mode " + std::to_string(theirs.virt_addr) + ")"
                                      : std::string()) +
                ", this rank " + std::to_string(nics) + " of " + mine.provider +
                "; every rank needs the same provider and nets_per_rank");
    }
    for (size_t n = 0; n < nics; ++n) {
      const uint8_t* slot = blob + sizeof(SetupHeader) + n * kAddressSlotBytes;
      uint32_t length = 0;
      std::memcpy(&length, slot, sizeof(length));
      if (length == 0 || length > kMaxAddressBytes) {
        raise(Status::invalid_argument,
              who(my_rank) + ": rank " + std::to_string(r) + "'s setup gives NIC " +
                  std::to_string(n) + " an endpoint address of " + std::to_string(length) +
                  " bytes; an address slot holds 1 to " + std::to_string(kMaxAddressBytes));
      }
      addresses[n][static_cast<size_t>(r)].assign(slot + sizeof(length),
                                                   slot + sizeof(length) + length);
    }
  }
  return addresses;
}

void check_region_desc(const RegionDesc& desc, int peer, uint32_t num_nics, bool virt_addr,
                       int my_rank, const char* what) {
  std::string problem;
  if (desc.owner_rank != static_cast<uint32_t>(peer)) {
    problem = "is rank " + std::to_string(desc.owner_rank) + "'s";
  } else if (desc.num_nics != num_nics) {
    problem = "has " + std::to_string(desc.num_nics) + " NIC keys, this engine has " +
              std::to_string(num_nics) + " NICs";
  } else if (desc.bytes == 0) {
    problem = "is empty";
  } else if (!virt_addr && desc.addr != 0) {
    problem = "has base address " + std::to_string(desc.addr) +
              " where the provider addresses regions by offset (base 0)";
  } else if (virt_addr && desc.addr > UINT64_MAX - desc.bytes) {
    problem = "wraps around the address space (base " + std::to_string(desc.addr) + ", " +
              std::to_string(desc.bytes) + " bytes)";
  }
  if (problem.empty()) return;
  raise(Status::invalid_argument, who(my_rank) + ": " + what + ": the region descriptor of rank " +
                                      std::to_string(peer) + " " + problem);
}

void check_region_descs(std::span<const RegionDesc> descs, uint32_t num_nics, bool virt_addr,
                        int my_rank) {
  for (size_t r = 0; r < descs.size(); ++r) {
    check_region_desc(descs[r], static_cast<int>(r), num_nics, virt_addr, my_rank, "exchange");
  }
}

}  // namespace ferry::te::peer_info
