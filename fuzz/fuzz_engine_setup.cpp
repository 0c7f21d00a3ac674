// The engine's setup exchange as every rank reads it: the allgathered blobs of all ranks (endpoint
// addresses, provider, NIC count, addressing mode) are either refused with an error naming the
// rank, or give per NIC and rank an address that fits its slot. Nothing is read beyond the blobs.
//
// Input: this rank's NIC count (1 byte) | world size (1 byte) | the blobs, rank-major; missing
// bytes are zero (a blob of zeros is a rank that opened no NIC).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "transfer_engine/error.h"
#include "transfer_engine/peer_info.h"

namespace {

namespace peer_info = ferry::te::peer_info;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_engine_setup: %s\n", what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const int nics = 1 + data[0] % ferry::te::kMaxNics;
  const int world = 1 + data[1] % 4;
  data += 2;
  size -= 2;

  peer_info::LocalSetup mine;
  mine.provider = "tcp;ofi_rxm";
  mine.virt_addr = false;
  for (int n = 0; n < nics; ++n) mine.addresses.push_back(std::vector<uint8_t>(16, uint8_t(n)));

  // Sized exactly as the allgather returns it, so an overread is the sanitizer's to see.
  std::vector<uint8_t> all(peer_info::kSetupBlobBytes * size_t(world), 0);
  std::memcpy(all.data(), data, size < all.size() ? size : all.size());
  try {
    const auto addresses = peer_info::parse_setups(all, world, mine, 0);
    if (addresses.size() != size_t(nics)) fail("one address list per NIC");
    for (const auto& per_rank : addresses) {
      if (per_rank.size() != size_t(world)) fail("one address per rank");
      for (const auto& a : per_rank) {
        if (a.empty() || a.size() > peer_info::kMaxAddressBytes) fail("an address outside its slot");
      }
    }
  } catch (const ferry::Error& e) {
    if (e.status() != ferry::Status::invalid_argument) fail("a bad blob is an invalid argument");
    if (std::strstr(e.what(), "rank ") == nullptr) fail("the error names no rank");
  }
  return 0;
}
