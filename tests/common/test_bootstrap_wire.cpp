// What the bootstrap reads from the wire, without a socket: the MAC against its published test
// vectors, the handshake's checks, header classification, and bounded rank lists.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "transfer_engine/bootstrap_wire.h"
#include "transfer_engine/error.h"
#include "transfer_engine/hmac.h"
#include "transfer_engine/ranks.h"

namespace ferry::te {
namespace {


std::vector<uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }

std::string hex(const uint8_t* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    out += digits[p[i] >> 4];
    out += digits[p[i] & 15];
  }
  return out;
}
std::string hex(const Digest& d) { return hex(d.data(), d.size()); }

// ---- SHA-256 (FIPS 180-4 examples) and HMAC-SHA-256 (RFC 4231 test cases 1-7) ------------------

TEST(Sha256, PublishedVectors) {
  EXPECT_EQ(hex(sha256(bytes(""))),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(hex(sha256(bytes("abc"))),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex(sha256(bytes("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"))),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(hex(sha256(bytes("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmno"
                             "ijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"))),
            "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1");
}

TEST(Sha256, AMillionAsFedInUnevenPiecesHashesLikeOneBuffer) {
  const std::vector<uint8_t> a(1000000, 'a');
  Sha256 s;
  size_t at = 0;
  for (size_t piece = 1; at < a.size(); piece = piece * 3 % 997 + 1) {
    const size_t n = std::min(piece, a.size() - at);
    s.update(a.data() + at, n);
    at += n;
  }
  EXPECT_EQ(hex(s.finish()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_EQ(hex(sha256(a)), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(HmacSha256, Rfc4231TestCases) {
  struct Case {
    std::vector<uint8_t> key, data;
    std::string mac;
  };
  std::vector<uint8_t> key4(25);
  std::iota(key4.begin(), key4.end(), uint8_t{1});
  const std::vector<Case> cases = {
      {std::vector<uint8_t>(20, 0x0b), bytes("Hi There"),
       "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"},
      {bytes("Jefe"), bytes("what do ya want for nothing?"),
       "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"},
      {std::vector<uint8_t>(20, 0xaa), std::vector<uint8_t>(50, 0xdd),
       "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe"},
      {key4, std::vector<uint8_t>(50, 0xcd),
       "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"},
      {std::vector<uint8_t>(131, 0xaa), bytes("Test Using Larger Than Block-Size Key - Hash Key First"),
       "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"},
      {std::vector<uint8_t>(131, 0xaa),
       bytes("This is a test using a larger than block-size key and a larger than block-size "
             "data. The key needs to be hashed before being used by the HMAC algorithm."),
       "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    EXPECT_EQ(hex(hmac_sha256(cases[i].key, cases[i].data)), cases[i].mac) << "case " << i;
  }
  // Test case 5 is published truncated to 128 bits.
  const Digest truncated =
      hmac_sha256(std::vector<uint8_t>(20, 0x0c), bytes("Test With Truncation"));
  EXPECT_EQ(hex(truncated.data(), 16), "a3b6167473100ee06e0c796c2955552b");
}

TEST(HmacSha256, PartsAreTheirConcatenation) {
  const auto key = bytes("key");
  const auto whole = bytes("ferry root nonce-one nonce-two");
  const auto a = bytes("ferry root "), b = bytes("nonce-one "), c = bytes("nonce-two");
  const std::span<const uint8_t> parts[] = {a, b, c};
  EXPECT_EQ(hmac_sha256(key, parts), hmac_sha256(key, whole));
}

// ---- bounded rank lists -----------------------------------------------------------------------

TEST(DescribeRanks, NamesTheFirstFewAndCountsTheRest) {
  EXPECT_EQ(describe_ranks(std::vector<int>{}), "no rank");
  EXPECT_EQ(describe_ranks(std::vector<int>{2}), "rank 2");
  EXPECT_EQ(describe_ranks(std::vector<int>{2, 5, 7}), "ranks 2, 5, 7");
  EXPECT_EQ(describe_ranks(std::vector<int>{2, 5, 7, 9}, 3), "ranks 2, 5, 7 and 1 other");
  std::vector<int> many(1 << 24);
  std::iota(many.begin(), many.end(), 0);
  const std::string text = describe_ranks(many);
  EXPECT_EQ(text, "ranks 0, 1, 2, 3, 4, 5, 6, 7 and 16777208 others");
}

// ---- handshake --------------------------------------------------------------------------------

class Handshake : public ::testing::Test {
 protected:
  Digest key = wire::make_job_key("explicit\nsecret");
  Digest other_key = wire::make_job_key("explicit\nanother job");
  wire::Nonce member_nonce{{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}};
  wire::Nonce root_nonce{{21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36}};
};

TEST_F(Handshake, MembersAndRootWithOneKeyRecogniseEachOther) {
  wire::Nonce parsed{};
  ASSERT_TRUE(wire::parse_greeting(wire::make_greeting(member_nonce), parsed));
  EXPECT_EQ(parsed, member_nonce);
  wire::Nonce seen{};
  EXPECT_EQ(wire::check_challenge(wire::make_challenge(key, member_nonce, root_nonce), key,
                                  member_nonce, seen),
            wire::ChallengeCheck::ok);
  EXPECT_EQ(seen, root_nonce);
  const auto hello = wire::check_hello(wire::make_hello(key, root_nonce, member_nonce, 3, 8), key,
                                       root_nonce, member_nonce);
  EXPECT_TRUE(hello.authentic);
  EXPECT_EQ(hello.rank, 3);
  EXPECT_EQ(hello.world_size, 8);
}

TEST_F(Handshake, ARootWithAnotherKeyIsRecognisedBeforeTheMemberSaysAnything) {
  wire::Nonce seen{};
  EXPECT_EQ(wire::check_challenge(wire::make_challenge(other_key, member_nonce, root_nonce), key,
                                  member_nonce, seen),
            wire::ChallengeCheck::wrong_key);
  // A challenge made for another member's nonce (a replay) fails the same way.
  wire::Nonce stale = member_nonce;
  stale[0] ^= 1;
  EXPECT_EQ(wire::check_challenge(wire::make_challenge(key, stale, root_nonce), key, member_nonce,
                                  seen),
            wire::ChallengeCheck::wrong_key);
  std::vector<uint8_t> garbage(wire::kChallengeBytes, 0x41);
  EXPECT_EQ(wire::check_challenge(garbage, key, member_nonce, seen), wire::ChallengeCheck::not_ferry);
  auto old = wire::make_challenge(key, member_nonce, root_nonce);
  old[4] = 1;  // version 1
  EXPECT_EQ(wire::check_challenge(old, key, member_nonce, seen), wire::ChallengeCheck::wrong_version);
  EXPECT_EQ(wire::check_challenge(std::span(old).first(10), key, member_nonce, seen),
            wire::ChallengeCheck::not_ferry);
}

TEST_F(Handshake, AHelloIsTrustedOnlyWithTheKeyAndForTheseNonces) {
  EXPECT_FALSE(wire::check_hello(wire::make_hello(other_key, root_nonce, member_nonce, 1, 2), key,
                                 root_nonce, member_nonce)
                   .authentic);
  // A root's own answer cannot be turned into a member's hello (the MACs carry their direction).
  const auto challenge = wire::make_challenge(key, member_nonce, root_nonce);
  std::vector<uint8_t> reflected(wire::kHelloBytes, 0);
  std::memcpy(reflected.data(), challenge.data(), 8);
  std::memcpy(reflected.data() + 16, challenge.data() + 8 + wire::kNonceBytes, wire::kMacBytes);
  EXPECT_FALSE(wire::check_hello(reflected, key, root_nonce, member_nonce).authentic);
  // Changing the claimed rank after the MAC breaks it.
  auto hello = wire::make_hello(key, root_nonce, member_nonce, 1, 2);
  hello[8] = 0;
  const auto forged = wire::check_hello(hello, key, root_nonce, member_nonce);
  EXPECT_FALSE(forged.authentic);
  EXPECT_EQ(forged.rank, -1) << "an unauthenticated hello must not report a rank";
  // A hello from an earlier connection (other root nonce) is a replay.
  wire::Nonce other_root = root_nonce;
  other_root[15] ^= 0x80;
  EXPECT_FALSE(wire::check_hello(wire::make_hello(key, other_root, member_nonce, 1, 2), key,
                                 root_nonce, member_nonce)
                   .authentic);
}

TEST_F(Handshake, GreetingsOfAnotherSizeOrProtocolAreNotGreetings) {
  wire::Nonce parsed{};
  auto greeting = wire::make_greeting(member_nonce);
  EXPECT_FALSE(wire::parse_greeting(std::span(greeting).first(wire::kGreetingBytes - 1), parsed));
  greeting[0] ^= 0xff;
  EXPECT_FALSE(wire::parse_greeting(greeting, parsed));
}

TEST(JobKey, TheKeyNeverAppearsInWhatTravels) {
  const std::string secret = "correct horse battery staple";
  const Digest key = wire::make_job_key("explicit\n" + secret);
  const wire::Nonce n{};
  const auto challenge = wire::make_challenge(key, n, n);
  const auto hello = wire::make_hello(key, n, n, 1, 2);
  for (std::span<const uint8_t> sent : {std::span<const uint8_t>(challenge),
                                        std::span<const uint8_t>(hello)}) {
    const std::string text(sent.begin(), sent.end());
    EXPECT_EQ(text.find(secret), std::string::npos);
    EXPECT_EQ(text.find(std::string(key.begin(), key.end())), std::string::npos);
  }
}

// ---- framed messages --------------------------------------------------------------------------

std::vector<uint8_t> raw(const wire::MsgHeader& h) {
  std::vector<uint8_t> out(sizeof(h));
  std::memcpy(out.data(), &h, sizeof(h));
  return out;
}

TEST(MessageHeader, TheRootActsOnlyOnAContributionOfTheAgreedSizeAndSequence) {
  wire::MsgHeader h;
  using wire::AtRoot;
  using wire::MsgType;
  EXPECT_EQ(wire::classify_at_root(raw(wire::make_header(MsgType::data, 4, 64)), 4, 64, h),
            AtRoot::contribution);
  EXPECT_EQ(wire::classify_at_root(raw(wire::make_header(MsgType::data, 4, 100000)), 4, 64, h),
            AtRoot::wrong_size);
  EXPECT_EQ(h.bytes, 100000u);
  EXPECT_EQ(wire::classify_at_root(raw(wire::make_header(MsgType::data, 5, 64)), 4, 64, h),
            AtRoot::out_of_step);
  EXPECT_EQ(wire::classify_at_root(raw(wire::make_header(MsgType::query, 4, 0)), 4, 64, h),
            AtRoot::query);
  EXPECT_EQ(wire::classify_at_root(raw(wire::make_header(MsgType::query, 3, 0)), 4, 64, h),
            AtRoot::stale_query);
  EXPECT_EQ(wire::classify_at_root(raw(wire::make_header(MsgType::query, 4, 1u << 30)), 4, 64, h),
            AtRoot::out_of_step)
      << "a query carries no payload";
  EXPECT_EQ(wire::classify_at_root(raw(wire::make_header(MsgType::result, 4, 64)), 4, 64, h),
            AtRoot::out_of_step);
  auto bad = raw(wire::make_header(MsgType::data, 4, 64));
  bad[0] ^= 1;
  EXPECT_EQ(wire::classify_at_root(bad, 4, 64, h), AtRoot::garbage);
  EXPECT_EQ(wire::classify_at_root(std::span(bad).first(10), 4, 64, h), AtRoot::garbage);
  wire::MsgHeader unknown = wire::make_header(MsgType::data, 4, 64);
  unknown.type = 1;  // the old in-band hello
  EXPECT_EQ(wire::classify_at_root(raw(unknown), 4, 64, h), AtRoot::garbage);
}

TEST(MessageHeader, AnAbortsTextAndStatusAreBounded) {
  wire::MsgHeader h = wire::make_header(wire::MsgType::abort, 2, uint64_t{1} << 40);
  EXPECT_EQ(wire::abort_text_bytes(h), wire::kMaxAbortTextBytes);
  EXPECT_EQ(wire::abort_status(h), Status::timeout);
  h.seq = 999;
  EXPECT_EQ(wire::abort_status(h), Status::internal);
  h.seq = 0;
  EXPECT_EQ(wire::abort_status(h), Status::internal);
  wire::MsgHeader parsed;
  EXPECT_EQ(wire::classify_at_member(raw(wire::make_header(wire::MsgType::result, 7, 96)), 7, 96,
                                     parsed),
            wire::AtMember::result);
  EXPECT_EQ(wire::classify_at_member(raw(wire::make_header(wire::MsgType::result, 7, 1u << 31)), 7,
                                     96, parsed),
            wire::AtMember::out_of_step);
}

TEST(MessageHeader, AQueryIsFoundOnlyBehindAFirstContributionThatFits) {
  const auto first = raw(wire::make_header(wire::MsgType::data, 0, 256));
  const auto query = raw(wire::make_header(wire::MsgType::query, 0, 0));
  std::vector<uint8_t> peeked = first;
  peeked.resize(peeked.size() + 256, 'h');
  peeked.insert(peeked.end(), query.begin(), query.end());
  EXPECT_TRUE(wire::query_behind_first_contribution(peeked, 256));
  EXPECT_FALSE(wire::query_behind_first_contribution(std::span(peeked).first(100), 256));
  // A first header claiming more than it may must not send the search past the peeked bytes.
  auto huge = raw(wire::make_header(wire::MsgType::data, 0, ~uint64_t{0} - 8));
  huge.insert(huge.end(), query.begin(), query.end());
  EXPECT_FALSE(wire::query_behind_first_contribution(huge, 256));
}

}  // namespace
}  // namespace ferry::te
