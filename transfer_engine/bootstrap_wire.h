// What the TCP bootstrap sends and receives, as pure functions: building and checking the
// handshake, and classifying every header before its length or type is used. Nothing here touches
// a socket, so each function can be fuzzed on its own (fuzz/fuzz_bootstrap_*.cpp).
//
// Handshake (fixed sizes, little-endian fields), before a connection carries anything else:
//   greeting   member -> root: handshake magic, version, member nonce. Nothing about the job or
//              the rank.
//   challenge  root -> member: magic, version, root nonce,
//              HMAC(key, "ferry root" | member nonce | root nonce)
//              The member checks it before it sends anything that identifies it: a process that
//              took the port (or another job's root) learns a random nonce and nothing else.
//   hello      member -> root: magic, version, rank, world size,
//              HMAC(key, "ferry member" | root nonce | member nonce | rank | world size)
//              The root checks it before it trusts the rank: a client without the key is closed
//              having learnt one random nonce and a MAC over nonces.
// Both MACs are over fresh nonces of both sides and carry their direction, so neither side's answer
// can be replayed or reflected as the other's. The key never travels.
//
// After the handshake every message is a MsgHeader followed by `bytes` payload, in host byte order
// (all ranks of one job run the same build):
//   data    member -> root: this rank's contribution to allgather #seq
//   result  root -> member: the whole rank-major allgather #seq
//   abort   root -> member: the operation failed; payload is the error text, seq the Status
//   query   member -> root: "my deadline for #seq passed; who is missing?" (no payload)
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "transfer_engine/error.h"
#include "transfer_engine/hmac.h"

namespace ferry::te::wire {

constexpr uint32_t kMagic = 0x46725942;           // "FrYB": framed messages
constexpr uint32_t kHandshakeMagic = 0x46725948;  // "FrYH": handshake, never taken for a frame
constexpr uint32_t kVersion = 2;
constexpr size_t kNonceBytes = 16;
constexpr size_t kMacBytes = 32;
using Nonce = std::array<uint8_t, kNonceBytes>;

constexpr size_t kGreetingBytes = 4 + 4 + kNonceBytes;
constexpr size_t kChallengeBytes = 4 + 4 + kNonceBytes + kMacBytes;
constexpr size_t kHelloBytes = 4 + 4 + 4 + 4 + kMacBytes;
// The most an unauthenticated connection can make the root read.
constexpr size_t kMaxHandshakeBytes = kHelloBytes > kGreetingBytes ? kHelloBytes : kGreetingBytes;

// The 32-byte key both sides hold, from the material of launch_env's job_key_source.
Digest make_job_key(std::string_view material);

std::array<uint8_t, kGreetingBytes> make_greeting(const Nonce& member_nonce);
// The member's nonce, or false for anything that is not a greeting of this protocol version.
bool parse_greeting(std::span<const uint8_t> bytes, Nonce& member_nonce);

std::array<uint8_t, kChallengeBytes> make_challenge(const Digest& key, const Nonce& member_nonce,
                                                    const Nonce& root_nonce);
enum class ChallengeCheck { ok, not_ferry, wrong_version, wrong_key };
// Member side. On ok, root_nonce holds the root's nonce.
ChallengeCheck check_challenge(std::span<const uint8_t> bytes, const Digest& key,
                               const Nonce& member_nonce, Nonce& root_nonce);

std::array<uint8_t, kHelloBytes> make_hello(const Digest& key, const Nonce& root_nonce,
                                            const Nonce& member_nonce, int32_t rank,
                                            int32_t world_size);
struct HelloCheck {
  bool authentic = false;  // the MAC proves the sender holds the key (rank and world are its word)
  int32_t rank = -1;
  int32_t world_size = 0;
};
// Root side. Rank and world size are filled in only for an authentic hello.
HelloCheck check_hello(std::span<const uint8_t> bytes, const Digest& key, const Nonce& root_nonce,
                       const Nonce& member_nonce);

// ---- framed messages ---------------------------------------------------------------------------

enum class MsgType : uint32_t { data = 2, result = 3, abort = 4, query = 5 };

struct MsgHeader {
  uint32_t magic = kMagic;
  uint32_t type = 0;
  uint64_t seq = 0;
  uint64_t bytes = 0;
};
static_assert(sizeof(MsgHeader) == 24);

MsgHeader make_header(MsgType type, uint64_t seq, uint64_t bytes);
// False unless `raw` holds at least a header with the magic and a known type.
bool parse_header(std::span<const uint8_t> raw, MsgHeader& header);

// What the root does with a header from an authenticated member while it gathers allgather #seq of
// `bytes` bytes per rank.
enum class AtRoot {
  contribution,  // data for #seq of the right size: read `bytes` payload bytes next
  query,         // that member gave up on #seq (or a later one): report who is missing
  stale_query,   // a question about an operation that completed since: ignore
  wrong_size,    // data for #seq of another size: the ranks disagree on the call
  out_of_step,   // anything else from a member (a result, an abort, another #seq, a query with a payload)
  garbage,       // not a header of this protocol
};
AtRoot classify_at_root(std::span<const uint8_t> raw, uint64_t seq, uint64_t bytes, MsgHeader& header);

// What a member does with a header from the root while it waits for allgather #seq of `total` bytes.
enum class AtMember {
  result,       // read `total` bytes next
  abort,        // read abort_text_bytes(header) bytes of text next, then fail with abort_status
  out_of_step,  // a header of this protocol that is neither
  garbage,
};
AtMember classify_at_member(std::span<const uint8_t> raw, uint64_t seq, uint64_t total,
                            MsgHeader& header);

// Abort text is read up to this many bytes; the rest of a longer one is not waited for.
constexpr size_t kMaxAbortTextBytes = 4096;
size_t abort_text_bytes(const MsgHeader& header);
// The status an abort carries; anything out of range is internal.
Status abort_status(const MsgHeader& header);

// During setup, a member that is ready has sent its first contribution (data of at most
// `max_first_bytes`); a query queued behind it means that member's setup deadline passed. `peeked`
// is what the socket holds, unconsumed.
bool query_behind_first_contribution(std::span<const uint8_t> peeked, size_t max_first_bytes);

}  // namespace ferry::te::wire
