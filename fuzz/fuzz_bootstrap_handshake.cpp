// The TCP bootstrap's handshake as rank 0 and a member read it: any bytes in place of a greeting, a
// hello or a challenge are either refused or are exactly what the key holder would have sent. A
// hello or challenge that is accepted without being the one made with the key would be a forgery.
//
// Input: greeting (24 bytes) | hello (48) | challenge (56); short inputs leave later parts short.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>

#include "transfer_engine/bootstrap_wire.h"

namespace {

namespace wire = ferry::te::wire;

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "fuzz_bootstrap_handshake: %s\n", what);
  std::abort();
}

std::span<const uint8_t> take(const uint8_t*& data, size_t& size, size_t want) {
  const size_t n = size < want ? size : want;
  std::span<const uint8_t> part(data, n);
  data += n;
  size -= n;
  return part;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const ferry::te::Digest key = wire::make_job_key("explicit\nfuzz");
  wire::Nonce root_nonce, member_nonce;
  root_nonce.fill(0x52);
  member_nonce.fill(0x4d);

  const auto greeting = take(data, size, wire::kGreetingBytes);
  const auto hello = take(data, size, wire::kHelloBytes);
  const auto challenge = take(data, size, wire::kChallengeBytes);

  wire::Nonce greeted{};
  if (wire::parse_greeting(greeting, greeted)) {
    const auto expected = wire::make_greeting(greeted);
    if (greeting.size() != expected.size() ||
        std::memcmp(expected.data(), greeting.data(), greeting.size()) != 0) {
      fail("a greeting was accepted that differs from the one its nonce makes");
    }
    member_nonce = greeted;
  }

  const wire::HelloCheck h = wire::check_hello(hello, key, root_nonce, member_nonce);
  if (h.authentic) {
    const auto expected = wire::make_hello(key, root_nonce, member_nonce, h.rank, h.world_size);
    if (hello.size() != expected.size() || std::memcmp(expected.data(), hello.data(), hello.size()) != 0) {
      fail("a hello was trusted that the key holder did not make");
    }
  } else if (h.rank != -1 || h.world_size != 0) {
    fail("an unauthenticated hello reported a rank");
  }

  wire::Nonce seen{};
  if (wire::check_challenge(challenge, key, member_nonce, seen) == wire::ChallengeCheck::ok) {
    const auto expected = wire::make_challenge(key, member_nonce, seen);
    if (challenge.size() != expected.size() ||
        std::memcmp(expected.data(), challenge.data(), challenge.size()) != 0) {
      fail("a challenge was accepted that the key holder did not make");
    }
  }
  return 0;
}
