#include "csrc/agreement.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "csrc/argcheck.h"
#include "csrc/errors.h"
#include "csrc/plan.h"
#include "transfer_engine/ranks.h"

namespace ferry::ep {
namespace {

constexpr size_t kRanksNamed = 4;  // per field: the first few differing ranks, then a count

void copy_text(char* dst, size_t capacity, const std::string& text) {
  std::memset(dst, 0, capacity);
  std::memcpy(dst, text.data(), std::min(text.size(), capacity - 1));
}

// A peer's text field: up to its first NUL or the end of the field, unprintable bytes as '?'.
std::string read_text(const char* field, size_t capacity) {
  std::string text;
  for (size_t i = 0; i < capacity && field[i] != '\0'; ++i) {
    const unsigned char c = static_cast<unsigned char>(field[i]);
    text += c >= 0x20 && c < 0x7f ? char(c) : '?';
  }
  return text;
}

struct Field {
  const char* name;
  int32_t ConfigAgreement::* member;
  const char* (*name_of)(int value);  // null: print the number
};

const Field kFields[] = {
    {"world_size", &ConfigAgreement::world_size, nullptr},
    {"num_experts", &ConfigAgreement::num_experts, nullptr},
    {"experts_per_token", &ConfigAgreement::experts_per_token, nullptr},
    {"max_tokens_per_rank", &ConfigAgreement::max_tokens_per_rank, nullptr},
    {"hidden_dim", &ConfigAgreement::hidden_dim, nullptr},
    {"in_dtype", &ConfigAgreement::in_dtype, dtype_name},
    {"scale_block", &ConfigAgreement::scale_block, nullptr},
    {"out_dtype", &ConfigAgreement::out_dtype, dtype_name},
    {"private_tokens", &ConfigAgreement::private_tokens, nullptr},
    {"dp_size", &ConfigAgreement::dp_size, nullptr},
    {"device", &ConfigAgreement::device, device_name},
    {"nets_per_rank", &ConfigAgreement::nets_per_rank, nullptr},
    {"combine_weights", &ConfigAgreement::combine_weights, combine_weights_name},
};

std::string value_text(const Field& f, int32_t v) {
  return f.name_of ? std::string(f.name_of(v)) + " (" + std::to_string(v) + ")" : std::to_string(v);
}

// "rank 1 has 64, rank 3 has 64 and 5 more (7 of 8 ranks differ from rank 0)"
template <class ValueOf>
std::string differing(const std::vector<int>& ranks, int world_size, int reference, ValueOf&& value_of) {
  std::string text;
  const size_t named = std::min(ranks.size(), kRanksNamed);
  for (size_t i = 0; i < named; ++i) {
    if (i > 0) text += ", ";
    text += "rank " + std::to_string(ranks[i]) + " has " + value_of(ranks[i]);
  }
  if (ranks.size() > named) text += " and " + std::to_string(ranks.size() - named) + " more";
  text += " (" + std::to_string(ranks.size()) + " of " + std::to_string(world_size) + " ranks differ from rank " +
          std::to_string(reference) + ")";
  return text;
}

void append(std::string& message, const std::string& part) {
  if (!message.empty()) message += "; ";
  message += part;
}

}  // namespace

ConfigAgreement describe_config(const ferry_a2a_config_t& c, int bootstrap_rank, const std::string& provider,
                                Status status, const std::string& error) {
  ConfigAgreement a;
  std::memset(&a, 0, sizeof a);
  a.magic = kAgreementMagic;
  a.wire_version = kWireVersion;
  a.rank = bootstrap_rank;
  a.status = int32_t(status);
  a.world_size = c.world_size;
  a.num_experts = c.num_experts;
  a.experts_per_token = c.experts_per_token;
  a.max_tokens_per_rank = c.max_tokens_per_rank;
  a.hidden_dim = c.hidden_dim;
  a.in_dtype = enum_value(c.in_dtype);
  a.scale_block = c.scale_block;
  a.out_dtype = enum_value(c.out_dtype);
  a.device = enum_value(c.device);
  a.nets_per_rank = c.nets_per_rank;
  a.dp_size = c.dp_size;
  a.private_tokens = c.private_tokens == -1 ? c.max_tokens_per_rank : c.private_tokens;
  a.combine_weights = enum_value(c.combine_weights);
  copy_text(a.provider, sizeof a.provider, provider);
  copy_text(a.error, sizeof a.error, error);
  return a;
}

AgreementOutcome check_agreement(std::span<const uint8_t> all, int world_size, int me) {
  AgreementOutcome out;
  if (world_size < 1 || all.size() != size_t(world_size) * kAgreementBytes) {
    out.status = Status::internal;
    out.message = "config agreement: " + std::to_string(all.size()) + " bytes for " + std::to_string(world_size) +
                  " ranks of " + std::to_string(kAgreementBytes);
    return out;
  }
  std::vector<ConfigAgreement> d(static_cast<size_t>(world_size));
  for (int r = 0; r < world_size; ++r) std::memcpy(&d[size_t(r)], all.data() + size_t(r) * kAgreementBytes, kAgreementBytes);

  // Another build (or not Ferry at all): nothing else of its description can be read.
  std::vector<int> foreign, other_version, misplaced, readable;
  for (int r = 0; r < world_size; ++r) {
    const ConfigAgreement& a = d[size_t(r)];
    if (a.magic != kAgreementMagic) foreign.push_back(r);
    else if (a.wire_version != kWireVersion) other_version.push_back(r);
    else if (a.rank != r) misplaced.push_back(r);
    else readable.push_back(r);
  }
  if (!foreign.empty())
    append(out.message, te::describe_ranks(foreign, kRanksNamed) +
                            " sent no Ferry config description (another program on the bootstrap, or a build of "
                            "another byte order)");
  if (!other_version.empty())
    append(out.message, differing(other_version, world_size, me, [&](int r) {
             return "wire version " + std::to_string(d[size_t(r)].wire_version);
           }) + ": this build speaks wire version " + std::to_string(kWireVersion) +
                            "; every rank must run a build of the same wire version");
  if (!misplaced.empty())
    append(out.message, "the bootstrap delivered the description of rank " +
                            std::to_string(d[size_t(misplaced[0])].rank) + " in the place of rank " +
                            std::to_string(misplaced[0]) +
                            (misplaced.size() > 1 ? " (and " + std::to_string(misplaced.size() - 1) + " more)" : ""));
  if (!readable.empty()) {
    const int reference = readable[0];
    const ConfigAgreement& ref = d[size_t(reference)];
    for (const Field& f : kFields) {
      std::vector<int> ranks;
      for (int r : readable)
        if (d[size_t(r)].*f.member != ref.*f.member) ranks.push_back(r);
      if (ranks.empty()) continue;
      append(out.message, std::string(f.name) + ": rank " + std::to_string(reference) + " has " +
                              value_text(f, ref.*f.member) + ", " +
                              differing(ranks, world_size, reference,
                                        [&](int r) { return value_text(f, d[size_t(r)].*f.member); }));
    }
    const std::string ref_provider = read_text(ref.provider, sizeof ref.provider);
    std::vector<int> ranks;
    for (int r : readable)
      if (read_text(d[size_t(r)].provider, sizeof ref.provider) != ref_provider) ranks.push_back(r);
    if (!ranks.empty())
      append(out.message, "provider: rank " + std::to_string(reference) + " has \"" + ref_provider + "\", " +
                              differing(ranks, world_size, reference, [&](int r) {
                                return "\"" + read_text(d[size_t(r)].provider, sizeof ref.provider) + "\"";
                              }));
    std::vector<int> invalid;
    for (int r : readable)
      if (r != me && d[size_t(r)].status != 0) invalid.push_back(r);
    if (!invalid.empty())
      append(out.message, "the config of rank " + std::to_string(invalid[0]) + " fails its own checks (" +
                              read_text(d[size_t(invalid[0])].error, sizeof ref.error) + ")" +
                              (invalid.size() > 1 ? "; so do those of " +
                                                        te::describe_ranks(std::span(invalid).subspan(1), kRanksNamed)
                                                  : ""));
  }
  if (!out.message.empty()) {
    out.status = Status::invalid_argument;
    out.message = "the ranks' configs do not agree: " + out.message +
                  ". Every rank must pass the same value of each field that shapes the wire or the buffers";
  }
  return out;
}

}  // namespace ferry::ep
