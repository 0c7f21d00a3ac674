// What the bootstrap does with a framed header from an authenticated peer: rank 0 gathering
// allgather #seq, a member waiting for its result, and rank 0 looking behind a ready member's
// first contribution. Whatever the bytes, the verdict agrees with the header, lengths are only
// used once they match what this side expects, and an abort's text is bounded.
//
// Input: seq (8 bytes) | bytes per rank (8) | world size (2) | header (24) | peeked socket bytes.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>

#include "transfer_engine/bootstrap_wire.h"

namespace {

namespace wire = ferry::te::wire;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_bootstrap_message: %s\n", what);
  std::abort();
}

template <typename T>
T next(const uint8_t*& data, size_t& size) {
  T v{};
  const size_t n = size < sizeof(T) ? size : sizeof(T);
  std::memcpy(&v, data, n);
  data += n;
  size -= n;
  return v;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const uint64_t seq = next<uint64_t>(data, size);
  const uint64_t bytes = next<uint64_t>(data, size);
  const uint16_t world = next<uint16_t>(data, size);
  const size_t header_bytes = size < sizeof(wire::MsgHeader) ? size : sizeof(wire::MsgHeader);
  const std::span<const uint8_t> raw(data, header_bytes);
  const std::span<const uint8_t> peeked(data, size);

  wire::MsgHeader h;
  switch (wire::classify_at_root(raw, seq, bytes, h)) {
    case wire::AtRoot::contribution:
      if (h.bytes != bytes || h.seq != seq || h.type != uint32_t(wire::MsgType::data)) {
        fail("a contribution of another size or sequence was accepted");
      }
      break;
    case wire::AtRoot::query:
    case wire::AtRoot::stale_query:
      if (h.bytes != 0) fail("a query with a payload was taken for a query");
      break;
    case wire::AtRoot::wrong_size:
      if (h.bytes == bytes) fail("a contribution of the agreed size was refused");
      break;
    case wire::AtRoot::out_of_step:
    case wire::AtRoot::garbage: break;
  }

  const uint64_t total = bytes * (uint64_t(world) + 1);
  switch (wire::classify_at_member(raw, seq, total, h)) {
    case wire::AtMember::result:
      if (h.bytes != total || h.seq != seq) fail("a result of another size or sequence was accepted");
      break;
    case wire::AtMember::abort:
      if (wire::abort_text_bytes(h) > wire::kMaxAbortTextBytes) fail("abort text beyond its bound");
      if (wire::abort_status(h) == ferry::Status::ok) fail("an abort that says ok");
      break;
    case wire::AtMember::out_of_step:
    case wire::AtMember::garbage: break;
  }

  // The peek buffer of rank 0 is 2 headers and a host name; the search must stay inside it.
  (void)wire::query_behind_first_contribution(peeked, 256);
  (void)wire::query_behind_first_contribution(peeked, static_cast<size_t>(bytes));
  return 0;
}
