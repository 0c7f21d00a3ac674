// Region descriptors as exchange() receives them from every rank: each is refused with an error
// naming the rank, or comes from that rank, carries one key per NIC of this engine, covers at least
// one byte, and (offset addressing) has base 0 or (virtual addressing) does not wrap.
//
// Input: NIC count and addressing mode (1 byte) | RegionDesc per rank (88 bytes each, at most 64).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "transfer_engine/error.h"
#include "transfer_engine/peer_info.h"

namespace {

namespace peer_info = ferry::te::peer_info;
using ferry::te::RegionDesc;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_region_desc: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint32_t nics = 1 + data[0] % ferry::te::kMaxNics;
  const bool virt_addr = (data[0] & 0x80) != 0;
  data += 1;
  size -= 1;
  const size_t world = size / sizeof(RegionDesc) > 64 ? 64 : size / sizeof(RegionDesc);
  if (world == 0) return 0;
  std::vector<RegionDesc> descs(world);
  std::memcpy(descs.data(), data, world * sizeof(RegionDesc));
  try {
    peer_info::check_region_descs(descs, nics, virt_addr, 0);
    for (size_t r = 0; r < world; ++r) {
      const RegionDesc& d = descs[r];
      if (d.owner_rank != r || d.num_nics != nics || d.bytes == 0) fail("a descriptor that does not fit passed");
      if (!virt_addr && d.addr != 0) fail("an offset-addressed region with a base passed");
      if (virt_addr && d.addr + d.bytes < d.addr) fail("a wrapping region passed");
    }
  } catch (const ferry::Error& e) {
    if (e.status() != ferry::Status::invalid_argument) fail("a bad descriptor is an invalid argument");
    if (std::strstr(e.what(), "rank ") == nullptr) fail("the error names no rank");
  }
  return 0;
}
