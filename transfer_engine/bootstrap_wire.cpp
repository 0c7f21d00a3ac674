#include "transfer_engine/bootstrap_wire.h"

#include <cstring>

namespace ferry::te::wire {
namespace {

constexpr std::string_view kRootLabel = "ferry root";
constexpr std::string_view kMemberLabel = "ferry member";

void put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t get_u32(const uint8_t* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(p[i]) << (8 * i);
  return v;
}

std::span<const uint8_t> bytes_of(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

Digest root_mac(const Digest& key, const Nonce& member_nonce, const Nonce& root_nonce) {
  const std::span<const uint8_t> parts[] = {bytes_of(kRootLabel), member_nonce, root_nonce};
  return hmac_sha256(key, parts);
}

Digest member_mac(const Digest& key, const Nonce& root_nonce, const Nonce& member_nonce,
                  const uint8_t* rank_and_world) {
  const std::span<const uint8_t> parts[] = {bytes_of(kMemberLabel), root_nonce, member_nonce,
                                            std::span<const uint8_t>(rank_and_world, 8)};
  return hmac_sha256(key, parts);
}

bool has_prefix(std::span<const uint8_t> bytes) {
  return get_u32(bytes.data()) == kHandshakeMagic && get_u32(bytes.data() + 4) == kVersion;
}

}  // namespace

Digest make_job_key(std::string_view material) {
  Sha256 s;
  constexpr std::string_view kDomain = "ferry bootstrap job key v1\n";
  s.update(kDomain.data(), kDomain.size());
  s.update(material.data(), material.size());
  return s.finish();
}

std::array<uint8_t, kGreetingBytes> make_greeting(const Nonce& member_nonce) {
  std::array<uint8_t, kGreetingBytes> out{};
  put_u32(out.data(), kHandshakeMagic);
  put_u32(out.data() + 4, kVersion);
  std::memcpy(out.data() + 8, member_nonce.data(), kNonceBytes);
  return out;
}

bool parse_greeting(std::span<const uint8_t> bytes, Nonce& member_nonce) {
  if (bytes.size() != kGreetingBytes || !has_prefix(bytes)) return false;
  std::memcpy(member_nonce.data(), bytes.data() + 8, kNonceBytes);
  return true;
}

std::array<uint8_t, kChallengeBytes> make_challenge(const Digest& key, const Nonce& member_nonce,
                                                    const Nonce& root_nonce) {
  std::array<uint8_t, kChallengeBytes> out{};
  put_u32(out.data(), kHandshakeMagic);
  put_u32(out.data() + 4, kVersion);
  std::memcpy(out.data() + 8, root_nonce.data(), kNonceBytes);
  const Digest mac = root_mac(key, member_nonce, root_nonce);
  std::memcpy(out.data() + 8 + kNonceBytes, mac.data(), kMacBytes);
  return out;
}

ChallengeCheck check_challenge(std::span<const uint8_t> bytes, const Digest& key,
                               const Nonce& member_nonce, Nonce& root_nonce) {
  if (bytes.size() != kChallengeBytes || get_u32(bytes.data()) != kHandshakeMagic) {
    return ChallengeCheck::not_ferry;
  }
  if (get_u32(bytes.data() + 4) != kVersion) return ChallengeCheck::wrong_version;
  Nonce theirs;
  std::memcpy(theirs.data(), bytes.data() + 8, kNonceBytes);
  const Digest want = root_mac(key, member_nonce, theirs);
  if (!digests_equal(want.data(), bytes.data() + 8 + kNonceBytes, kMacBytes)) {
    return ChallengeCheck::wrong_key;
  }
  root_nonce = theirs;
  return ChallengeCheck::ok;
}

std::array<uint8_t, kHelloBytes> make_hello(const Digest& key, const Nonce& root_nonce,
                                            const Nonce& member_nonce, int32_t rank,
                                            int32_t world_size) {
  std::array<uint8_t, kHelloBytes> out{};
  put_u32(out.data(), kHandshakeMagic);
  put_u32(out.data() + 4, kVersion);
  put_u32(out.data() + 8, static_cast<uint32_t>(rank));
  put_u32(out.data() + 12, static_cast<uint32_t>(world_size));
  const Digest mac = member_mac(key, root_nonce, member_nonce, out.data() + 8);
  std::memcpy(out.data() + 16, mac.data(), kMacBytes);
  return out;
}

HelloCheck check_hello(std::span<const uint8_t> bytes, const Digest& key, const Nonce& root_nonce,
                       const Nonce& member_nonce) {
  HelloCheck out;
  if (bytes.size() != kHelloBytes || !has_prefix(bytes)) return out;
  const Digest want = member_mac(key, root_nonce, member_nonce, bytes.data() + 8);
  if (!digests_equal(want.data(), bytes.data() + 16, kMacBytes)) return out;
  out.authentic = true;
  out.rank = static_cast<int32_t>(get_u32(bytes.data() + 8));
  out.world_size = static_cast<int32_t>(get_u32(bytes.data() + 12));
  return out;
}

MsgHeader make_header(MsgType type, uint64_t seq, uint64_t bytes) {
  MsgHeader h;
  h.type = static_cast<uint32_t>(type);
  h.seq = seq;
  h.bytes = bytes;
  return h;
}

bool parse_header(std::span<const uint8_t> raw, MsgHeader& header) {
  if (raw.size() < sizeof(MsgHeader)) return false;
  std::memcpy(&header, raw.data(), sizeof(MsgHeader));
  return header.magic == kMagic && header.type >= static_cast<uint32_t>(MsgType::data) &&
         header.type <= static_cast<uint32_t>(MsgType::query);
}

AtRoot classify_at_root(std::span<const uint8_t> raw, uint64_t seq, uint64_t bytes,
                        MsgHeader& header) {
  if (!parse_header(raw, header)) return AtRoot::garbage;
  const auto type = static_cast<MsgType>(header.type);
  if (type == MsgType::query && header.bytes == 0) {
    return header.seq < seq ? AtRoot::stale_query : AtRoot::query;
  }
  if (type != MsgType::data || header.seq != seq) return AtRoot::out_of_step;
  return header.bytes == bytes ? AtRoot::contribution : AtRoot::wrong_size;
}

AtMember classify_at_member(std::span<const uint8_t> raw, uint64_t seq, uint64_t total,
                            MsgHeader& header) {
  if (!parse_header(raw, header)) return AtMember::garbage;
  const auto type = static_cast<MsgType>(header.type);
  if (type == MsgType::abort) return AtMember::abort;
  if (type == MsgType::result && header.seq == seq && header.bytes == total) return AtMember::result;
  return AtMember::out_of_step;
}

size_t abort_text_bytes(const MsgHeader& header) {
  return header.bytes < kMaxAbortTextBytes ? static_cast<size_t>(header.bytes) : kMaxAbortTextBytes;
}

Status abort_status(const MsgHeader& header) {
  if (header.seq == 0 || header.seq > static_cast<uint64_t>(Status::internal)) {
    return Status::internal;
  }
  return static_cast<Status>(header.seq);
}

bool query_behind_first_contribution(std::span<const uint8_t> peeked, size_t max_first_bytes) {
  MsgHeader first, second;
  if (!parse_header(peeked, first) || first.type != static_cast<uint32_t>(MsgType::data) ||
      first.bytes > max_first_bytes) {
    return false;
  }
  const size_t next = sizeof(MsgHeader) + static_cast<size_t>(first.bytes);
  if (peeked.size() < next + sizeof(MsgHeader)) return false;
  return parse_header(peeked.subspan(next), second) &&
         second.type == static_cast<uint32_t>(MsgType::query);
}

}  // namespace ferry::te::wire
