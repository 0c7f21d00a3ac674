// Writes the seed inputs of the transfer engine's fuzz targets (fuzz_bootstrap_*, fuzz_engine_setup,
// fuzz_region_desc) with the real encoders, so the seeds start the fuzzers inside every accepting
// branch: valid handshakes made with the fuzz targets' key, well-formed frames and setup blobs, and
// the malformed inputs that once mattered (an address length of 100000).
//   make_te_seeds <fuzz/corpus>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "transfer_engine/bootstrap_wire.h"
#include "transfer_engine/peer_info.h"

namespace {

namespace fs = std::filesystem;
namespace wire = ferry::te::wire;
namespace peer_info = ferry::te::peer_info;
using Bytes = std::vector<uint8_t>;

fs::path g_root;

void write(const std::string& target, const std::string& name, const Bytes& bytes) {
  const fs::path dir = g_root / target;
  fs::create_directories(dir);
  std::ofstream(dir / name, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                                     static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
void append(Bytes& out, const T& value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  out.insert(out.end(), p, p + sizeof(T));
}

template <typename Range>
void append_range(Bytes& out, const Range& r) {
  out.insert(out.end(), r.begin(), r.end());
}

void handshake_seeds() {
  const ferry::te::Digest key = wire::make_job_key("explicit\nfuzz");
  const ferry::te::Digest other = wire::make_job_key("explicit\nanother job");
  wire::Nonce root_nonce, member_nonce;
  root_nonce.fill(0x52);
  member_nonce.fill(0x4d);
  Bytes valid;
  append_range(valid, wire::make_greeting(member_nonce));
  append_range(valid, wire::make_hello(key, root_nonce, member_nonce, 3, 8));
  append_range(valid, wire::make_challenge(key, member_nonce, root_nonce));
  write("fuzz_bootstrap_handshake", "valid", valid);
  Bytes wrong;
  append_range(wrong, wire::make_greeting(member_nonce));
  append_range(wrong, wire::make_hello(other, root_nonce, member_nonce, 1, 2));
  append_range(wrong, wire::make_challenge(other, member_nonce, root_nonce));
  write("fuzz_bootstrap_handshake", "wrong_key", wrong);
  write("fuzz_bootstrap_handshake", "truncated", Bytes(valid.begin(), valid.begin() + 40));
}

Bytes message(uint64_t seq, uint64_t bytes, uint16_t world, const wire::MsgHeader& h,
              const Bytes& tail = {}) {
  Bytes out;
  append(out, seq);
  append(out, bytes);
  append(out, world);
  append(out, h);
  append_range(out, tail);
  return out;
}

void message_seeds() {
  using wire::MsgType;
  write("fuzz_bootstrap_message", "contribution",
        message(4, 64, 3, wire::make_header(MsgType::data, 4, 64)));
  write("fuzz_bootstrap_message", "result", message(4, 64, 3, wire::make_header(MsgType::result, 4, 256)));
  write("fuzz_bootstrap_message", "query", message(4, 64, 3, wire::make_header(MsgType::query, 4, 0)));
  write("fuzz_bootstrap_message", "abort_huge_text",
        message(0, 8, 1, wire::make_header(MsgType::abort, 2, uint64_t{1} << 40)));
  Bytes peek(256, 'h');
  append(peek, wire::make_header(MsgType::query, 0, 0));
  write("fuzz_bootstrap_message", "query_behind_host_name",
        message(0, 256, 3, wire::make_header(MsgType::data, 0, 256), peek));
}

Bytes setup_input(int nics, int world, int liar, const std::function<void(Bytes&)>& lie) {
  peer_info::LocalSetup mine;
  mine.provider = "tcp;ofi_rxm";
  for (int n = 0; n < nics; ++n) mine.addresses.push_back(Bytes(16, uint8_t(n)));
  const Bytes blob = peer_info::encode_setup(mine, 0);
  Bytes out{uint8_t(nics - 1), uint8_t(world - 1)};
  for (int r = 0; r < world; ++r) {
    Bytes b = blob;
    if (r == liar) lie(b);
    append_range(out, b);
  }
  return out;
}

void setup_seeds() {
  const auto honest = [](Bytes&) {};
  write("fuzz_engine_setup", "two_ranks_one_nic", setup_input(1, 2, -1, honest));
  write("fuzz_engine_setup", "three_ranks_two_nics", setup_input(2, 3, -1, honest));
  write("fuzz_engine_setup", "address_length_100000", setup_input(1, 2, 1, [](Bytes& b) {
          const uint32_t length = 100000;
          std::memcpy(b.data() + sizeof(peer_info::SetupHeader), &length, sizeof(length));
        }));
  write("fuzz_engine_setup", "unterminated_provider", setup_input(1, 2, 1, [](Bytes& b) {
          std::memset(b.data() + offsetof(peer_info::SetupHeader, provider), 'p',
                      peer_info::kProviderNameBytes);
        }));
}

void region_seeds() {
  auto descs = [](uint8_t mode, int world, uint32_t nics, uint64_t addr, int liar, uint32_t lie_owner) {
    Bytes out{mode};
    for (int r = 0; r < world; ++r) {
      ferry::te::RegionDesc d;
      d.owner_rank = r == liar ? lie_owner : uint32_t(r);
      d.num_nics = nics;
      d.addr = addr;
      d.bytes = 4096;
      for (uint32_t n = 0; n < nics; ++n) d.keys[n] = 0x9e3779b97f4a7c15ull * (r + 1) + n;
      append(out, d);
    }
    return out;
  };
  write("fuzz_region_desc", "four_ranks_offsets", descs(0, 4, 1, 0, -1, 0));
  write("fuzz_region_desc", "two_nics_virtual", descs(0x81, 3, 2, 0x7f0000001000, -1, 0));
  write("fuzz_region_desc", "wrong_owner", descs(0, 2, 1, 0, 1, 0));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <fuzz/corpus>\n", argv[0]);
    return 2;
  }
  g_root = argv[1];
  handshake_seeds();
  message_seeds();
  setup_seeds();
  region_seeds();
  return 0;
}
