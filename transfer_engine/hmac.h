// SHA-256 (FIPS 180-4) and HMAC-SHA-256 (RFC 2104): the keyed MAC of the bootstrap handshake.
// Written here once rather than pulled in from a crypto library: the bootstrap needs nothing else,
// and every Ferry build links without OpenSSL. Checked against the published test vectors.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>

namespace ferry::te {

using Digest = std::array<uint8_t, 32>;

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t bytes);
  Digest finish();

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t total_bytes_ = 0;
};

Digest sha256(std::span<const uint8_t> data);

// HMAC-SHA-256 of the concatenation of `parts` (so callers need not copy fields into one buffer).
Digest hmac_sha256(std::span<const uint8_t> key, std::span<const std::span<const uint8_t>> parts);
Digest hmac_sha256(std::span<const uint8_t> key, std::span<const uint8_t> message);

// Compares in time that does not depend on where the digests first differ.
bool digests_equal(const uint8_t* a, const uint8_t* b, size_t bytes);

}  // namespace ferry::te
