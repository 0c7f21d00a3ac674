// The config descriptions every rank receives at ferry_a2a_create (check_agreement): any bytes from
// any number of ranks give a status and a message, the message empty exactly when all is well and
// short whatever the world size.
//   input: world-1, this rank, then world * kAgreementBytes bytes (zero-padded); bit 0 of the
//   first byte of each description asks for a readable header (magic, version, rank) so that the
//   field comparison is reached
#include <cstdint>
#include <cstring>
#include <vector>

#include "csrc/agreement.h"
#include "fuzz/layout_from_bytes.h"

namespace {

[[noreturn]] void fail(const char* what) { ferry::fuzz::broken("fuzz_agreement", what); }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ferry::ep;
  if (size < 2) return 0;
  const int world = data[0] % 64 + 1;
  const int me = data[1] % world;
  std::vector<uint8_t> all(size_t(world) * kAgreementBytes, 0);
  std::memcpy(all.data(), data + 2, size - 2 < all.size() ? size - 2 : all.size());
  for (int r = 0; r < world; ++r) {
    uint8_t* d = all.data() + size_t(r) * kAgreementBytes;
    if (!(d[0] & 1)) continue;
    ConfigAgreement a;
    std::memcpy(&a, d, sizeof a);
    a.magic = kAgreementMagic;
    a.wire_version = kWireVersion;
    a.rank = r;
    std::memcpy(d, &a, sizeof a);
  }
  const AgreementOutcome out = check_agreement(all, world, me);
  if ((out.status == ferry::Status::ok) != out.message.empty()) fail("a status that its message contradicts");
  if (out.message.size() > 8192) fail("an unbounded message");
  for (const char ch : out.message)
    if (ch < 0x20 || ch > 0x7e) fail("a peer's unprintable byte in the message");
  return 0;
}
